"""The request queue and dynamic batching: one worker thread runs one `generate()` at a time.

The asyncio side only submits jobs and awaits their events; the model is never used by two threads at once.
Batch formation: the worker takes the oldest waiting request and waits for company until `max_batch_size` rows are
waiting: while fewer rows wait than the last batch answered (those clients tend to come back at once), for up to 4 x
`batch_wait_ms`; otherwise until `batch_wait_ms` passes without a new arrival (also at most 4x in all); counted from
the oldest request's arrival or the end of the previous batch, whichever is later (see `_deadline`). Then it takes,
oldest first, every waiting request that can share its `generate()` call and fits in `max_batch_size` rows. What can
share a call is decided by `Engine.group_key`: in logits and hidden modes everything (alpha, sampling settings,
max_tokens and stop strings are all per row); in weights mode, requests with the same alpha. A request's rows (its
`n` choices, its prompts) always run in one call; a request with more rows than `max_batch_size` runs alone. The
oldest request always goes first, so no request waits behind later ones for long.

There is no continuous batching: requests that arrive while a batch runs wait for the next one. A row that ends
early (EOS, stop string, max_tokens, client gone) is answered at once; the call ends when its last row ends.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

from .engine import Engine, RowSpec
from .errors import ApiError


log = logging.getLogger("peft_clm.serve")


@dataclass(eq=False)
class Job:
    """One HTTP request's rows, and `emit`, a thread-safe callable that hands an event to the waiting request.

    Events: ("text", row, delta) (streamed jobs only), ("finish", row, reason, completion_tokens, text),
    ("error", message).
    """

    id: str
    specs: list[RowSpec]
    emit: Callable[[tuple], None]
    stream: bool = False
    key: Any = None
    arrival: float = field(default_factory=time.monotonic)
    cancelled: bool = False  # set from the event loop when the client goes away; read by the worker each step


class _Sink:
    def __init__(self, job: Job, index: int) -> None:
        self.job, self.index = job, index

    def text(self, delta: str) -> None:
        if self.job.stream:  # a non-streamed answer travels once, whole, with its finish event
            self.job.emit(("text", self.index, delta))

    def finish(self, reason: str, completion_tokens: int, text: str) -> None:
        self.job.emit(("finish", self.index, reason, completion_tokens, text))

    def cancelled(self) -> bool:
        return self.job.cancelled


class Batcher:
    """Queue requests and run them in batches on one worker thread.

    Example:
        ```py
        >>> batcher = Batcher(engine, max_batch_size=8, batch_wait_ms=10, max_queue=256)
        >>> batcher.start()
        >>> batcher.submit(Job("cmpl-1", [RowSpec(ids, {"concise": 0.7}, max_tokens=16)], emit=print))
        >>> batcher.close()
        ```
    """

    def __init__(self, engine: Engine, max_batch_size: int = 8, batch_wait_ms: float = 10.0,
                 max_queue: int = 256) -> None:
        if max_batch_size < 1 or max_queue < 1 or batch_wait_ms < 0:
            raise ValueError(f"--max-batch-size and --max-queue must be >= 1 and --batch-wait-ms >= 0; got "
                             f"{max_batch_size}, {max_queue} and {batch_wait_ms}.")
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.batch_wait = batch_wait_ms / 1000.0
        self.max_queue = max_queue
        self._queue: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._running: list[Job] = []
        self._closing = False
        self._thread = threading.Thread(target=self._work, name="peft-clm-batcher", daemon=True)
        self.batches = 0
        self.rows_done = 0
        self._free_since = 0.0  # when the worker last finished a batch (monotonic seconds)
        self._last_arrival = 0.0
        self._last_rows = 0  # rows of the last batch

    # ------------------------------------------------------------------ event-loop side
    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue a job; raises `ApiError` 503 (with Retry-After) when the queue is full or the server is stopping."""
        job.key = self.engine.group_key(job.specs[0])
        with self._cv:
            if self._closing:
                raise ApiError(503, "the server is shutting down; retry on another replica.",
                               headers={"Retry-After": "1"})
            if len(self._queue) >= self.max_queue:
                raise ApiError(503, f"the server's queue is full ({self.max_queue} requests waiting); retry shortly.",
                               headers={"Retry-After": "1"}, code="queue_full")
            self._queue.append(job)
            self._last_arrival = job.arrival
            self._cv.notify()

    def cancel(self, job: Job) -> None:
        """The client went away: drop the job if it waits, or end its rows at the next step if it runs."""
        job.cancelled = True
        with self._cv:
            try:
                self._queue.remove(job)
            except ValueError:
                pass

    def stats(self) -> dict:
        with self._cv:
            return {"queued": len(self._queue), "running_rows": sum(len(j.specs) for j in self._running),
                    "batches": self.batches, "rows_done": self.rows_done}

    def close(self, timeout: float = 30.0) -> None:
        """Stop: refuse new jobs, end what is left (by now no client waits for it), join the worker."""
        with self._cv:
            self._closing = True
            for job in list(self._queue) + self._running:
                job.cancelled = True
            self._queue.clear()
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ------------------------------------------------------------------ worker side
    def _deadline(self, head: Job) -> float:
        # Company is awaited from the head's arrival or the end of the last batch, whichever is later, and for at
        # most 4 x `batch_wait`. Clients answered by the last batch tend to send their next requests within
        # moments; if the batch started without them they would form a cohort of their own, out of step with the
        # one queued meanwhile, and batches would stay half full for as long as the load lasts. So while fewer rows
        # wait than the last batch answered, the worker waits for them up to the cap; otherwise it starts once
        # `batch_wait` passes without a new arrival (the requests of a burst arrive a few ms apart, each parsed
        # and tokenized on the event loop).
        start = max(head.arrival, self._free_since)
        cap = start + 4 * self.batch_wait
        if self._rows_ready(head.key) < self._last_rows:
            return cap
        return min(max(start, self._last_arrival) + self.batch_wait, cap)

    def _rows_ready(self, key: Any) -> int:
        return sum(len(j.specs) for j in self._queue if j.key == key)

    def _next_batch(self) -> Optional[list[Job]]:
        with self._cv:
            while True:
                while not self._queue and not self._closing:
                    self._cv.wait()
                if self._closing:
                    return None
                head = self._queue[0]
                while (not self._closing and self._queue and self._queue[0] is head
                       and self._rows_ready(head.key) < self.max_batch_size):
                    remaining = self._deadline(head) - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cv.wait(remaining)
                if self._closing:
                    return None
                if not self._queue or self._queue[0] is not head:
                    continue  # the head was cancelled while waiting: start over with the new oldest
                taken, rows = [], 0
                for job in list(self._queue):
                    n = len(job.specs)
                    if job.key == head.key and (not taken or rows + n <= self.max_batch_size):
                        taken.append(job)
                        rows += n
                for job in taken:
                    self._queue.remove(job)
                self._running = taken
                return taken

    def _work(self) -> None:
        while True:
            jobs = self._next_batch()
            if jobs is None:
                return
            specs = [s for job in jobs for s in job.specs]
            sinks = [_Sink(job, i) for job in jobs for i in range(len(job.specs))]
            self.batches += 1
            number = self.batches
            alphas = {tuple(sorted(s.alpha.items())) for s in specs}
            log.debug("batch %d: %d rows from %d request(s), %d distinct alpha(s), up to %d new tokens",
                      number, len(specs), len(jobs), len(alphas), max(s.max_tokens for s in specs))
            start = time.perf_counter()
            try:
                steps = self.engine.run_batch(specs, sinks)
            except Exception as e:  # the server stays up; every request of the batch gets the error
                log.exception("batch %d failed", number)
                for job in jobs:
                    job.emit(("error", f"generation failed: {type(e).__name__}: {e}"))
                steps = 0
            with self._cv:
                self._running = []
                self.rows_done += len(specs)
                self._free_since = time.monotonic()
                self._last_rows = len(specs)
            log.debug("batch %d done: %d steps in %.3f s", number, steps, time.perf_counter() - start)
