"""`peft-clm serve`: an OpenAI-compatible server where every request carries its own alpha, batched together.

- `engine.py` — the loaded model and one `generate()` call for rows with per-row alpha, sampling and stopping;
- `batcher.py` — the request queue and the worker thread that forms batches;
- `app.py` — the FastAPI app: endpoints, streaming, errors, request logs; `schemas.py` — request bodies;
- `knobs.py` — a request's `alpha`/`model` to per-row alphas; `detok.py` — incremental detokenization;
- `server.py` — loading, uvicorn, signals.

Needs the `serve` extra: `pip install "peft-clm[serve]"`.
"""
