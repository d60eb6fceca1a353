"""The FastAPI app: OpenAI-compatible endpoints over the batcher, with OpenAI-style errors and one log line per
request.

Endpoints: `POST /v1/chat/completions`, `POST /v1/completions` (JSON, or server-sent events with `stream: true`),
`GET /v1/models` (the base model first, then each adapter) and `GET /health`. Every response carries `usage` and the
`alpha` that was applied; a stream carries the usage in its last chunk with a finish reason (or, when the client
asks with `stream_options: {"include_usage": true}`, in a final chunk without choices, as OpenAI does).

A client that goes away is noticed while its request waits or runs: a queued request is dropped and a running one
ends its rows at the next decoding step (see `batcher.Batcher.cancel`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from ..router import UnroutablePrompt
from .batcher import Batcher, Job
from .engine import Engine, RowSpec
from .errors import ApiError
from .routing import RouteBatcher
from .schemas import ChatCompletionRequest, CompletionRequest, _Sampling


log = logging.getLogger("peft_clm.serve")


def create_app(engine: Engine, batcher: Batcher, *, max_new_tokens_limit: int = 1024,
               max_body_bytes: int = 1 << 20, drain_timeout: float = 30.0) -> FastAPI:
    """The ASGI app serving `engine` through `batcher` (started and stopped with the app's lifespan).

    Example:
        ```py
        >>> engine = Engine.load("smollm2", {"concise": "runs/concise"})
        >>> app = create_app(engine, Batcher(engine, max_batch_size=8))
        >>> uvicorn.run(app, port=8000)
        ```
    """
    knobs = engine.knobs
    created = int(time.time())
    route_batcher = RouteBatcher(engine) if engine.router is not None else None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        # Reached once uvicorn has drained the in-flight requests (or given up after its graceful timeout).
        stats = batcher.stats()
        batcher.close(timeout=drain_timeout)
        if route_batcher is not None:
            route_batcher.close()
        log.info("stopped: %d batches, %d sequences generated", stats["batches"], stats["rows_done"])

    app = FastAPI(title="peft-clm", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)

    # ------------------------------------------------------------------ errors, OpenAI style
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        log.info("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc.message)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return await _api_error(request, ApiError(400, _describe(exc.errors()), param=_param(exc.errors())))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}; this server has /v1/chat/completions, " \
                      "/v1/completions, /v1/models and /health."
        return await _api_error(request, ApiError(exc.status_code, message, headers=getattr(exc, "headers", None)))

    # ------------------------------------------------------------------ read-only endpoints
    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": knobs.base_id, "adapters": knobs.adapters, "interpolation": knobs.mode,
                "default_alpha": knobs.default, **batcher.stats()}

    @app.get("/v1/models")
    async def models() -> dict:
        base = {"id": knobs.base_id, "object": "model", "created": created, "owned_by": "peft-clm",
                "adapters": knobs.adapters, "interpolation": knobs.mode, "default_alpha": knobs.default,
                "max_model_len": engine.context_length}
        adapters = [{"id": name, "object": "model", "created": created, "owned_by": "peft-clm",
                     "parent": knobs.base_id, "root": knobs.base_id} for name in knobs.adapters]
        return {"object": "list", "data": [base, *adapters]}

    # ------------------------------------------------------------------ generation endpoints
    def target_of(model: str) -> str:
        if model != knobs.base_id and model not in knobs.adapters:
            names = [knobs.base_id, *knobs.adapters]
            raise ApiError(404, f"model {model!r} does not exist here; the models are {names} (the base model dials "
                           "every knob, an adapter's name that knob alone).", param="model", code="model_not_found")
        return model

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        body.check(max_new_tokens_limit)
        target = target_of(body.model)
        raw = body.prompts()
        prompts = [engine.encode_prompt(p) for p in raw]
        return await run(request, body, target, prompts, "cmpl", "prompt", raw)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        body.check(max_new_tokens_limit)
        target = target_of(body.model)
        messages = [m.as_template_dict() for m in body.messages]
        try:
            prompt = engine.encode_chat(messages)
        except ApiError:
            raise
        except Exception as e:  # the chat template itself refused the messages (e.g. roles out of order)
            raise ApiError(400, f"the chat template refused these messages: {e}", param="messages") from e
        return await run(request, body, target, [prompt], "chatcmpl", "messages", [messages])

    async def run(request: Request, body: _Sampling, target: str, prompts: list[list[int]], prefix: str,
                  prompt_param: str, raw: list[Any]) -> Response:
        chat = prefix == "chatcmpl"
        rid = f"{prefix}-{uuid.uuid4().hex[:24]}"
        rows = len(prompts) * body.n
        # Without max_tokens a completion gets 16 tokens (OpenAI's default), a chat answer what the context leaves,
        # up to --max-new-tokens-limit. Checked before any routing, which costs a forward pass.
        budgets = [engine.check_length(ids, body.max_tokens, max_new_tokens_limit, prompt_param,
                                       default=None if chat else 16) for ids in prompts]
        routes = None
        if knobs.routes(target, body.alpha):  # no alpha sent: each prompt at its route's alphas in the policy
            try:
                routes = await route_batcher.route(raw)
            except UnroutablePrompt as e:  # e.g. a chat without a user message
                raise ApiError(400, f"this request could not be routed: {e}", param=prompt_param) from None
            except Exception as e:  # noqa: BLE001  the server's fault: an OpenAI-style 500, logged
                log.exception("routing failed")
                raise ApiError(500, f"routing failed: {type(e).__name__}: {e}") from None
            alphas = knobs.resolve(target, knobs.routed([r for r in routes for _ in range(body.n)]), rows)
        else:
            alphas = knobs.resolve(target, body.alpha, rows)
        temperature = 1.0 if body.temperature is None else float(body.temperature)  # OpenAI's default
        specs = []
        for p, ids in enumerate(prompts):
            budget = budgets[p]
            for j in range(body.n):
                k = p * body.n + j
                seed = None if body.seed is None else (body.seed + k) % 2**64  # choice k draws from seed + k
                specs.append(RowSpec(ids, alphas[k], budget, temperature=temperature,
                                     top_p=1.0 if body.top_p is None else float(body.top_p), seed=seed,
                                     stop=tuple(body.stop_list()), ignore_eos=body.ignore_eos))
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(event: tuple) -> None:  # called on the worker thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass

        echoed = knobs.echo(body.alpha, alphas) if routes is None else (alphas[0] if rows == 1 else alphas)
        record = _Record(rid, target, echoed, rows, sum(len(ids) for ids in prompts), request.url.path, body.stream,
                         routes)
        job = Job(rid, specs, emit, stream=body.stream)
        batcher.submit(job)
        header = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                  "created": int(time.time()), "model": body.model, "alpha": record.alpha}
        if routes is not None:  # one route per prompt (a chat has one)
            header["route"] = routes[0] if chat else routes
        if body.stream:
            def close() -> None:
                if not record.complete:
                    batcher.cancel(job)
                record.log()

            return _EventStream(stream(job, events, record, header, chat, body.include_usage_chunk), close,
                                media_type="text/event-stream",
                                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await collect(request, job, events, record, header, chat)

    async def collect(request: Request, job: Job, events: asyncio.Queue, record: _Record, header: dict,
                      chat: bool) -> Response:
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            while not record.complete:
                get = asyncio.ensure_future(events.get())
                done, _ = await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    return Response(status_code=499)  # nobody reads it: the client has gone
                record.take(get.result())
        finally:
            gone.cancel()
            if not record.complete:
                batcher.cancel(job)
            record.log()
        if record.error:
            raise ApiError(500, record.error)
        choices = []
        for i, text in enumerate(record.texts):
            choice: dict[str, Any] = {"index": i, "finish_reason": record.reasons[i], "logprobs": None}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            choices.append(choice)
        obj = "chat.completion" if chat else "text_completion"
        return JSONResponse({**header, "object": obj, "choices": choices, "usage": record.usage()})

    async def stream(job: Job, events: asyncio.Queue, record: _Record, header: dict, chat: bool,
                     usage_chunk: bool) -> AsyncIterator[str]:
        def chunk(index: int, text: Optional[str], finish: Optional[str] = None, usage: Optional[dict] = None,
                  role: bool = False) -> str:
            if chat:
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else (
                    {} if text is None else {"content": text})
                choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}
            body = {**header, "choices": [choice]}
            if usage is not None:
                body["usage"] = usage
            return f"data: {json.dumps(body)}\n\n"

        try:
            if chat:
                for i in range(len(record.texts)):
                    yield chunk(i, None, role=True)
            while not record.complete:
                event = await events.get()  # cancelled here when Starlette sees the client disconnect
                record.take(event)
                if record.error:
                    yield f"data: {json.dumps(ApiError(500, record.error).body())}\n\n"
                    break
                if event[0] == "text":
                    yield chunk(event[1], event[2])
                elif event[0] == "finish":
                    last = record.complete and not usage_chunk
                    yield chunk(event[1], None, finish=event[2], usage=record.usage() if last else None)
            if usage_chunk and not record.error:
                yield f"data: {json.dumps({**header, 'choices': [], 'usage': record.usage()})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            if not record.complete:
                batcher.cancel(job)
            record.log()

    return app


class _EventStream(StreamingResponse):
    """A streamed response that runs `on_close` however it ends, also when the client leaves before the first
    chunk (then the body generator never starts and its own `finally` never runs)."""

    def __init__(self, content: AsyncIterator[str], on_close: Any, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


class _Record:
    """What one request produced, and its one log line."""

    def __init__(self, rid: str, target: str, alpha: Any, rows: int, prompt_total: int, path: str,
                 stream: bool, routes: Optional[list[str]] = None) -> None:
        self.rid, self.target, self.alpha, self.path, self.stream = rid, target, alpha, path, stream
        self.routes = routes
        self.prompt_total = prompt_total  # each prompt counted once, whatever n is (as OpenAI counts)
        n = rows
        self.texts = [""] * n
        self.reasons: list[Optional[str]] = [None] * n
        self.tokens = [0] * n
        self.remaining = n
        self.error: Optional[str] = None
        self.start = time.perf_counter()
        self.logged = False

    @property
    def complete(self) -> bool:
        return self.remaining == 0 or self.error is not None

    def take(self, event: tuple) -> None:
        if event[0] == "text":
            self.texts[event[1]] += event[2]
        elif event[0] == "finish":
            _, i, reason, tokens, text = event
            self.reasons[i], self.tokens[i], self.texts[i] = reason, tokens, text
            self.remaining -= 1
        elif event[0] == "error":
            self.error = event[1]

    def usage(self) -> dict:
        completion = sum(self.tokens)
        return {"prompt_tokens": self.prompt_total, "completion_tokens": completion,
                "total_tokens": self.prompt_total + completion}

    def log(self) -> None:
        if self.logged:
            return
        self.logged = True
        outcome = "error" if self.error else ("cancelled (client gone)" if not self.complete else
                                              ",".join(sorted({r for r in self.reasons if r})))
        log.info("%s %s model=%s%s alpha=%s prompt_tokens=%d completion_tokens=%d latency=%.3fs stream=%s finish=%s",
                 self.rid, self.path, self.target, "" if self.routes is None else f" route={','.join(self.routes)}",
                 _fmt_alpha(self.alpha), self.prompt_total, sum(self.tokens),
                 time.perf_counter() - self.start, self.stream, outcome)


def _fmt_alpha(alpha: Union[dict, list]) -> str:
    if isinstance(alpha, list):
        return "[" + " ".join(_fmt_alpha(a) for a in alpha) + "]"
    return ",".join(f"{k}:{v:g}" for k, v in alpha.items())


async def _disconnected(request: Request) -> None:
    """Return when the client closes the connection (the body has been read, so only a disconnect arrives)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _param(errors: list) -> Optional[str]:
    loc = [str(x) for x in (errors[0].get("loc") or []) if x != "body"] if errors else []
    return loc[0] if loc else None


def _describe(errors: list) -> str:
    """One sentence for the first problem pydantic found, naming the field and what it accepts."""
    if not errors:
        return "invalid request body."
    e = errors[0]
    where = ".".join(str(x) for x in e.get("loc", []) if x != "body")
    kind = e.get("type", "")
    if kind == "json_invalid":
        return f"the request body is not valid JSON ({e.get('ctx', {}).get('error', e.get('msg'))})."
    if kind == "extra_forbidden":
        return f"unknown field {where!r}; see the OpenAI API for the accepted fields (plus 'alpha' and 'ignore_eos')."
    if kind == "missing":
        return f"field {where!r} is required."
    if kind in ("model_attributes_type", "dict_type") and not where:
        return "the request body must be a JSON object."
    got = repr(e.get("input"))
    return f"{where or 'body'}: {e.get('msg')} (got {got if len(got) <= 80 else got[:77] + '...'})."


class BodySizeLimit:
    """ASGI middleware: refuse a request body over `max_bytes` with 413, by Content-Length or while it streams in."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"the request body is larger than this server's limit of {self.max_bytes} bytes (--max-body-bytes)."
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            response = JSONResponse(ApiError(413, message).body(), status_code=413)
            log.info("%s %s -> 413: %s", scope.get("method"), scope.get("path"), message)
            return await response(scope, receive, send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:  # a chunked body has no Content-Length: count as it arrives
                    raise HTTPException(413, message)
            return msg

        await self.app(scope, limited, send)
