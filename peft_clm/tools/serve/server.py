"""Run the server: load the model, build the app, serve with uvicorn until Ctrl-C or SIGTERM, drain, exit 0."""

from __future__ import annotations

import json
import logging
import signal
import sys
from typing import Optional


log = logging.getLogger("peft_clm.serve")


def configure_logging(level: str = "info") -> None:
    """Our log lines and uvicorn's, one format, on stderr; other libraries stay at warnings."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("peft_clm", "uvicorn", "uvicorn.error"):
        logging.getLogger(name).setLevel(level.upper())
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # loading bars are noise in a server log


def run_server(model: str, adapters: dict[str, str], *, interpolation: Optional[str] = None, alpha: float = 1.0,
               host: str = "127.0.0.1", port: int = 8000, max_batch_size: int = 8, batch_wait_ms: float = 10.0,
               max_queue: int = 256, max_new_tokens_limit: int = 1024, max_body_bytes: int = 1 << 20,
               dtype: str = "float32", device: Optional[str] = None, served_model_name: Optional[str] = None,
               context_length: Optional[int] = None, drain_timeout: float = 30.0, log_level: str = "info",
               threads: Optional[int] = None, router: Optional[str] = None, policy: Optional[str] = None) -> int:
    """Serve `model` with `adapters` ({name: directory}) on host:port; returns 0 after a clean shutdown.

    Example:
        ```py
        >>> run_server("smollm2", {"concise": "runs/concise"}, interpolation="logits", port=8000)
        ```
    """
    import uvicorn

    from .app import create_app
    from .batcher import Batcher
    from .engine import Engine

    configure_logging(log_level)
    if threads is not None:
        import torch

        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}.")
        torch.set_num_threads(threads)
    if max_new_tokens_limit < 1 or max_body_bytes < 1:
        raise ValueError("--max-new-tokens-limit and --max-body-bytes must be >= 1.")
    engine = Engine.load(model, adapters, interpolation=interpolation, alpha=alpha, dtype=dtype, device=device,
                         base_id=served_model_name, context_length=context_length, router=router, policy=policy)
    batcher = Batcher(engine, max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms, max_queue=max_queue)
    app = create_app(engine, batcher, max_new_tokens_limit=max_new_tokens_limit, max_body_bytes=max_body_bytes,
                     drain_timeout=drain_timeout)
    knobs = engine.knobs
    log.info("model %s with adapters %s, %s mode, default alpha %g, context %d tokens, on %s; batches of up to %d "
             "rows, waiting up to %g ms; queue of %d", knobs.base_id, knobs.adapters, knobs.mode, knobs.default,
             engine.context_length, engine.device, max_batch_size, batch_wait_ms, max_queue)
    if engine.router is not None:
        log.info("routing requests that send no alpha: router %s (routes %s), policy %s", router,
                 engine.router.labels, json.dumps(knobs.policy))
    config = uvicorn.Config(app, host=host, port=port, log_config=None, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=drain_timeout)
    server = uvicorn.Server(config)
    # While it runs, uvicorn handles SIGINT/SIGTERM itself: it stops accepting connections, lets the requests in
    # flight finish (up to --drain-timeout), runs the app's shutdown, then raises the caught signal again under the
    # handler that was there before. Ignoring that second delivery here makes a drained server exit with status 0
    # instead of dying of the signal it has already handled.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    server.run()
    log.info("bye")
    return 0
