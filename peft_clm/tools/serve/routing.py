"""Routing requests in batches: one base-model pass routes every request that arrived together.

`RouteBatcher`'s lifecycle:

- created by `create_app` when the engine has a router, on the event loop;
- `await route(prompts)` (event loop): the prompts are read into text at once (an unroutable prompt fails its own
  request only, with `UnroutablePrompt`) and queued; the first prompt of an empty queue schedules a drain after
  `window_s`, so requests arriving together share it;
- a drain takes the whole queue and routes it in one call on the batcher's single routing thread
  (`Engine.route_texts`, whose tokenizer no other thread uses), then hands each request its routes; requests that
  arrive while a drain runs wait for the next, which therefore routes them together too. A failure of the pass
  (the server's fault) fails the requests of that drain;
- `close()` at shutdown stops the routing thread; requests still waiting are answered with an error.

Why: routed one at a time, requests that arrive together reach the batcher staggered by one routing pass each, and
their generation batches come out smaller (`benchmarks/bench_serve.py`, 4 clients: 0.62x the unrouted load's
tokens/s one at a time, 0.98x shared; at 8 clients the batcher's 40 ms wait is still shorter than a pass).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any


log = logging.getLogger("peft_clm.serve")


class RouteBatcher:
    """Routes the prompts of requests that arrive together in one pass; see the module docstring."""

    def __init__(self, engine: Any, window_s: float = 0.005) -> None:
        self.engine = engine
        self.window_s = window_s
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="route")  # one pass at a time: one tokenizer
        self._queue: list[tuple[list[str], asyncio.Future]] = []

    async def route(self, prompts: list[Any]) -> list[str]:
        """The route of each prompt of one request."""
        texts = self.engine.routable_texts(prompts)  # raises UnroutablePrompt for this request alone
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._queue.append((texts, done))
        if len(self._queue) == 1:
            loop.call_later(self.window_s, lambda: asyncio.ensure_future(self._drain()))
        return await done

    async def _drain(self) -> None:
        batch, self._queue = self._queue, []
        texts = [t for request, _ in batch for t in request]
        start_s = time.perf_counter()
        try:
            routes = await asyncio.get_running_loop().run_in_executor(self._thread, self.engine.route_texts, texts)
        except Exception as e:  # noqa: BLE001  handed to every request of this pass
            for _, done in batch:
                if not done.done():
                    done.set_exception(e)
            return
        log.debug("routing pass: %d prompt(s) from %d request(s) in %.3fs", len(texts), len(batch),
                  time.perf_counter() - start_s)
        start = 0
        for request, done in batch:
            if not done.done():  # a client that left has cancelled its future
                done.set_result(routes[start : start + len(request)])
            start += len(request)

    def close(self) -> None:
        for _, done in self._queue:
            if not done.done():
                done.set_exception(RuntimeError("the server is shutting down"))
        self._queue = []
        self._thread.shutdown(wait=False)
