"""`lmforge serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the batching engine.

    GET  /                      a chat page (static HTML/JS shipped in the package)
    GET  /health                {"status": "ok"}
    GET  /metrics               Prometheus text: requests, tokens in/out, latency histogram, queue depth
    GET  /v1/models
    POST /v1/completions        (stream: true → server-sent events ending with "data: [DONE]")
    POST /v1/chat/completions   (the model's chat template; streaming too)

One thread owns the engine and steps it while there is work; requests from all clients join the same
batch (their decode steps share a forward pass). A client that disconnects stops its generation. Every
error is an OpenAI-style body ``{"error": {"message", "type", "param", "code"}}`` and never stops the
server.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from lmforge.errors import LmforgeError
from lmforge.infer.engine import Engine, Request
from lmforge.infer.generate import SamplingParams, chat_prompt

API_KEY_ENV = "LMFORGE_API_KEY"


@dataclass
class ServerSettings:
    max_batch: int = 16  # sequences decoded together
    max_queue: int = 64  # requests waiting for a row before new ones get 429
    max_tokens: int = 1024  # largest max_tokens a request may ask for
    max_n: int = 8  # largest n
    max_body_bytes: int = 1 << 20  # larger request bodies get 413
    api_key: str | None = None
    model_name: str = "lmforge"


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


# -- request bodies -------------------------------------------------------------------------------


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stop: str | list[str] | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    seed: int | None = None
    # common extensions (vLLM and others accept them too)
    top_k: int = Field(default=0, ge=0)
    min_p: float = Field(default=0.0, ge=0.0, lt=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    stream_options: dict[str, Any] | None = None


class CompletionBody(_Sampling):
    prompt: str | list[str]
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]] | None = ""


class ChatBody(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


# -- the engine thread ----------------------------------------------------------------------------


class Handle:
    """One request's channel from the engine thread to its HTTP handler. A streaming handler gets
    every event; a non-streaming one only the end of the request (no per-token thread hops)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, stream: bool):
        self.loop, self.stream = loop, stream
        self.events: asyncio.Queue = asyncio.Queue()
        self.request: Request | None = None
        self.cancelled = False

    def put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


class EngineWorker:
    """Steps the engine while there is work. With ``thread`` it runs in a thread of its own; `serve`
    instead runs ``run()`` on the main thread (see ``serve``)."""

    def __init__(self, engine: Engine, settings: ServerSettings, metrics, thread: bool = True):
        self.engine, self.settings, self.metrics = engine, settings, metrics
        self.submissions: queue.Queue = queue.Queue()
        self.handles: dict[int, Handle] = {}
        self.wake = threading.Event()
        self.running = True
        self.thread = None
        if thread:
            self.thread = threading.Thread(target=self.run, name="lmforge-engine", daemon=True)
            self.thread.start()

    def queue_depth(self) -> int:
        """Requests that will have to wait for a row (those arriving while rows are free do not)."""
        pending = self.submissions.qsize() + len(self.engine.waiting)
        return max(0, pending - (self.engine.max_batch - len(self.engine.active)))

    def submit(self, prompt_ids: list[int], params: SamplingParams, handle: Handle) -> None:
        if self.queue_depth() >= self.settings.max_queue:
            raise APIError(429, f"the server's queue is full ({self.settings.max_queue} requests waiting); retry shortly",
                           "rate_limit_error", code="queue_full")
        self.submissions.put((prompt_ids, params, handle))
        self.wake.set()

    def cancel(self, handle: Handle) -> None:
        handle.cancelled = True
        self.wake.set()

    def stop(self) -> None:
        self.running = False
        self.wake.set()
        if self.thread is not None:
            self.thread.join(timeout=5)

    def run(self) -> None:
        while self.running:
            while not self.submissions.empty():
                prompt_ids, params, handle = self.submissions.get()
                try:
                    handle.request = self.engine.add(prompt_ids, params)
                    self.handles[handle.request.id] = handle
                except LmforgeError as e:  # checked by the handler already; a last safety net
                    handle.put(APIError(400, str(e)))
            for handle in [h for h in self.handles.values() if h.cancelled]:
                self.engine.abort(handle.request)
                del self.handles[handle.request.id]
            self.metrics.queue_depth.set(self.queue_depth())
            self.metrics.active.set(len(self.engine.active))
            if not self.engine.has_work:
                self.wake.wait(timeout=0.5)
                self.wake.clear()
                continue
            if self.engine.active:
                self.metrics.batch.observe(len(self.engine.active))
            try:
                events = self.engine.step()
            except Exception as e:  # a bug must not take the server down: fail the requests in flight
                for handle in self.handles.values():
                    handle.put(APIError(500, f"generation failed: {e}", "server_error"))
                self.handles.clear()
                self.engine.active.clear()
                self.engine.waiting.clear()
                continue
            for event in events:
                handle = self.handles.get(event.sequence.request.id)
                if handle is not None:
                    if handle.stream:
                        handle.put(event)
                    if event.sequence.request.finished:
                        handle.put(None)  # end of the request
                        del self.handles[event.sequence.request.id]


class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

        disable_created_metrics()  # the *_created timestamp series only add noise here
        self.registry = CollectorRegistry()
        self.requests = Counter("lmforge_requests_total", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=self.registry)
        self.prompt_tokens = Counter("lmforge_prompt_tokens_total", "Prompt tokens received", registry=self.registry)
        self.completion_tokens = Counter("lmforge_completion_tokens_total", "Tokens generated", registry=self.registry)
        self.latency = Histogram("lmforge_request_latency_seconds", "Time from request to last token", ["endpoint"],
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120), registry=self.registry)
        self.queue_depth = Gauge("lmforge_queue_depth", "Requests waiting for a row in the engine", registry=self.registry)
        self.active = Gauge("lmforge_active_sequences", "Sequences being decoded", registry=self.registry)
        self.batch = Histogram("lmforge_batch_size", "Sequences sharing each decode step", buckets=(1, 2, 4, 8, 16, 32, 64),
                               registry=self.registry)


# -- the app --------------------------------------------------------------------------------------


def create_app(model, tokenizer, settings: ServerSettings | None = None, compile: bool = False, engine_thread: bool = True):
    """The FastAPI application serving ``model``; its engine worker starts with it (in a thread of its
    own, or, without ``engine_thread``, waiting for the caller to ``run()`` it)."""
    settings = settings or ServerSettings()
    metrics = Metrics()
    engine = Engine(model, tokenizer, max_batch=settings.max_batch, compile=compile)
    state: dict[str, EngineWorker] = {}
    created = int(time.time())
    context = model.config.block_size

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        state["worker"] = app.state.worker = EngineWorker(engine, settings, metrics, thread=engine_thread)
        yield
        state["worker"].stop()

    app = FastAPI(title="lmforge", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.metrics = metrics

    def error_response(e: APIError) -> JSONResponse:
        body = {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}
        return JSONResponse(body, status_code=e.status)

    @app.exception_handler(APIError)
    async def api_error(_request, e: APIError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        if first.get("type") == "json_invalid":
            return error_response(APIError(400, "the request body is not valid JSON", code="invalid_json"))
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return error_response(APIError(400, f"{param or 'body'}: {first.get('msg', 'invalid value')}", param=param,
                                       code="invalid_value"))

    @app.exception_handler(Exception)
    async def unexpected(_request, e: Exception):
        return error_response(APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error"))

    # -- plain endpoints --

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return resources.files("lmforge.serve").joinpath("static/chat.html").read_text(encoding="utf-8")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": created,
                                            "owned_by": "lmforge", "max_model_len": context}]}

    # -- generation --

    def sampling(body: _Sampling, max_tokens: int, prompt_tokens: int, logprobs: int | None) -> SamplingParams:
        if max_tokens > settings.max_tokens:
            raise APIError(400, f"max_tokens {max_tokens} is above this server's limit of {settings.max_tokens}",
                           param="max_tokens", code="max_tokens_too_large")
        if body.n > settings.max_n:
            raise APIError(400, f"n {body.n} is above this server's limit of {settings.max_n}", param="n", code="n_too_large")
        if prompt_tokens + max_tokens > context:
            raise APIError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                                f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} for the "
                                f"completion). Please reduce the prompt or the completion length.",
                           param="messages" if isinstance(body, ChatBody) else "prompt", code="context_length_exceeded")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        return SamplingParams(max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                              min_p=body.min_p, repetition_penalty=body.repetition_penalty,
                              frequency_penalty=body.frequency_penalty, presence_penalty=body.presence_penalty,
                              n=body.n, stop=stop, seed=body.seed, logprobs=logprobs)

    async def run(http: HTTPRequest, prompt_ids: list[int], params: SamplingParams, stream_fn, final_fn, endpoint: str):
        """Submit, then either stream events as SSE or collect them; aborts when the client leaves."""
        worker = state["worker"]
        handle = Handle(asyncio.get_running_loop(), stream=stream_fn is not None)
        worker.submit(prompt_ids, params, handle)
        metrics.prompt_tokens.inc(len(prompt_ids))
        started = time.perf_counter()

        async def events():
            while True:
                item = await handle.events.get()
                if item is None:
                    return
                if isinstance(item, APIError):
                    raise item
                yield item

        def count_output() -> None:
            if handle.request is not None:
                metrics.completion_tokens.inc(sum(len(s.tokens) for s in handle.request.sequences))

        if stream_fn is not None:
            async def sse():
                try:
                    async for chunk in stream_fn(events()):
                        yield f"data: {json.dumps(chunk)}\n\n"
                    yield "data: [DONE]\n\n"
                except APIError as e:
                    yield f"data: {json.dumps({'error': {'message': e.message, 'type': e.type, 'param': e.param, 'code': e.code}})}\n\n"
                finally:
                    if handle.request is None or not handle.request.finished:
                        worker.cancel(handle)  # the client went away: stop generating for it
                    count_output()
                    metrics.latency.labels(endpoint).observe(time.perf_counter() - started)

            return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        try:
            while True:  # wait for the end of the request, checking that the client is still there
                try:
                    item = await asyncio.wait_for(handle.events.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        worker.cancel(handle)
                        raise APIError(499, "client closed the request", code="client_closed") from None
                    continue
                if isinstance(item, APIError):
                    raise item
                if item is None:
                    break
        finally:
            count_output()
            metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
        return final_fn(handle.request)

    def usage(request: Request) -> dict:
        completion = sum(len(s.tokens) for s in request.sequences)
        return {"prompt_tokens": len(request.prompt_ids), "completion_tokens": completion,
                "total_tokens": len(request.prompt_ids) + completion}

    def token_text(token: int) -> str:
        return tokenizer.decode([token])

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: HTTPRequest):
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise APIError(400, "send one prompt per request (a list of prompts is not supported)", param="prompt")
        prompt = prompts[0]
        prompt_ids = tokenizer.encode(prompt) if prompt else []
        params = sampling(body, body.max_tokens, max(len(prompt_ids), 1), body.logprobs)
        rid, model_name = f"cmpl-{uuid.uuid4().hex[:24]}", settings.model_name
        prefix = prompt if body.echo else ""

        def legacy_logprobs(seq, start: int = 0) -> dict | None:
            if body.logprobs is None:
                return None
            tokens = seq.tokens[start:]
            return {"tokens": [token_text(t) for t in tokens], "token_logprobs": seq.logprobs[start:],
                    "top_logprobs": [{token_text(t): v for t, v in alts} if alts else None for alts in seq.top_logprobs[start:]],
                    "text_offset": []}

        async def stream(events):
            if prefix:
                for i in range(body.n):
                    yield {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name,
                           "choices": [{"text": prefix, "index": i, "logprobs": None, "finish_reason": None}]}
            async for ev in events:
                seq = ev.sequence
                lp = None
                if body.logprobs is not None and ev.appended:
                    lp = legacy_logprobs(seq, len(seq.tokens) - 1)
                if ev.text or ev.finished or lp:
                    yield {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name,
                           "choices": [{"text": ev.text, "index": seq.index, "logprobs": lp,
                                        "finish_reason": _reason(seq) if ev.finished else None}]}

        def final(request: Request):
            return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name,
                    "choices": [{"text": prefix + s.text, "index": s.index, "logprobs": legacy_logprobs(s),
                                 "finish_reason": _reason(s)} for s in request.sequences],
                    "usage": usage(request)}

        return await run(http, prompt_ids, params, stream if body.stream else None, final, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, http: HTTPRequest):
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": _text_of(m.content)}
                    for m in body.messages]
        max_tokens = body.max_completion_tokens or body.max_tokens or min(settings.max_tokens, context // 2)
        base = SamplingParams()
        prompt, with_stops = chat_prompt(tokenizer, messages, base)
        prompt_ids = tokenizer.encode(prompt)
        params = sampling(body, max_tokens, len(prompt_ids), (body.top_logprobs or 0) if body.logprobs else None)
        params.stop_token_ids = with_stops.stop_token_ids
        params.stop = params.stop + [s for s in with_stops.stop if s not in params.stop]
        rid, model_name = f"chatcmpl-{uuid.uuid4().hex[:24]}", settings.model_name

        def chat_logprobs(seq, start: int = 0) -> dict | None:
            if not body.logprobs:
                return None
            content = []
            for t, v, alts in zip(seq.tokens[start:], seq.logprobs[start:], seq.top_logprobs[start:]):
                text = token_text(t)
                content.append({"token": text, "logprob": v, "bytes": list(text.encode("utf-8")),
                                "top_logprobs": [{"token": token_text(a), "logprob": w, "bytes": list(token_text(a).encode("utf-8"))}
                                                 for a, w in (alts or [])]})
            return {"content": content}

        async def stream(events):
            for i in range(body.n):
                yield {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model_name,
                       "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                    "finish_reason": None}]}
            last_request = None
            async for ev in events:
                seq = ev.sequence
                last_request = seq.request
                lp = None
                if body.logprobs and ev.appended:
                    lp = chat_logprobs(seq, len(seq.tokens) - 1)
                if ev.text or lp:
                    yield {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model_name,
                           "choices": [{"index": seq.index, "delta": {"content": ev.text}, "logprobs": lp, "finish_reason": None}]}
                if ev.finished:
                    yield {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model_name,
                           "choices": [{"index": seq.index, "delta": {}, "logprobs": None, "finish_reason": _reason(seq)}]}
            if body.stream_options and body.stream_options.get("include_usage") and last_request is not None:
                yield {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model_name,
                       "choices": [], "usage": usage(last_request)}

        def final(request: Request):
            return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model_name,
                    "choices": [{"index": s.index, "message": {"role": "assistant", "content": s.text},
                                 "logprobs": chat_logprobs(s), "finish_reason": _reason(s)} for s in request.sequences],
                    "usage": usage(request)}

        return await run(http, prompt_ids, params, stream if body.stream else None, final, "/v1/chat/completions")

    return app


def _reason(seq) -> str:
    return "length" if seq.finish_reason == "length" else "stop"


def _text_of(content) -> str:
    """A message's text: a string, or the text parts of a list of content parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise APIError(400, "only text content parts are supported", param="messages", code="unsupported_content")
        parts.append(part["text"])
    return "".join(parts)


class AuthAndCount:
    """ASGI middleware: the API key on /v1 (compared in constant time), and request counts by status.

    (Plain ASGI rather than Starlette's BaseHTTPMiddleware, which interferes with streamed responses'
    disconnect detection.)
    """

    def __init__(self, app, settings: ServerSettings, metrics: Metrics):
        self.app, self.settings, self.metrics = app, settings, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if self.settings.api_key and path.startswith("/v1/"):
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, f"Bearer {self.settings.api_key}".encode()):
                self.metrics.requests.labels(path, "401").inc()
                body = json.dumps({"error": {"message": "missing or wrong API key; send Authorization: Bearer <key>",
                                             "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}).encode()
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return

        async def counting_send(message):
            if message["type"] == "http.response.start" and path != "/metrics":
                self.metrics.requests.labels(path, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets 413 before it reaches the app.

    The body is read here (never more than ``limit`` bytes kept), then replayed to the app; later
    messages (a client's disconnect) pass straight through.
    """

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._reject(send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending its body
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._reject(send)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, send):
        body = json.dumps({"error": {"message": f"the request body is larger than {self.limit} bytes",
                                     "type": "invalid_request_error", "param": None, "code": "body_too_large"}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def build_server_app(model, tokenizer, settings: ServerSettings, compile: bool = False, engine_thread: bool = True):
    """The app with its ASGI middleware: body size limit outside, then API key and counting."""
    app = create_app(model, tokenizer, settings, compile, engine_thread)
    wrapped = BodyLimit(AuthAndCount(app, settings, app.state.metrics), settings.max_body_bytes)
    wrapped.fastapi = app
    return wrapped


def serve(model_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, settings: ServerSettings | None = None,
          int8: bool = False, device: str = "auto", compile: bool = False) -> None:
    """Load ``model_dir`` and serve it until interrupted."""
    import uvicorn

    from lmforge.model.checkpoint import load_decoder, load_tokenizer_for
    from lmforge.utils import pick_device

    settings = settings or ServerSettings()
    settings.api_key = settings.api_key or os.environ.get(API_KEY_ENV) or None
    model = load_decoder(model_dir, pick_device(device))
    tokenizer = load_tokenizer_for(model)
    if int8:
        from lmforge.infer.engine import quantize_int8

        model = quantize_int8(model)
    if settings.model_name == "lmforge":
        settings.model_name = Path(model_dir).resolve().name
    app = build_server_app(model, tokenizer, settings, compile, engine_thread=False)
    # The engine runs here, on the main thread, which already ran the model's first torch operations;
    # uvicorn (which only tokenizes) gets a thread. Torch ops on a second thread run ~3x slower on small
    # CPUs, because the main thread's idle OpenMP team keeps spinning (measured: 341 vs 115 ms).
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    import sys

    sys.setswitchinterval(0.0005)  # hand the GIL back to the engine sooner than every 5 ms
    http_thread = threading.Thread(target=server.run, name="lmforge-http", daemon=True)
    http_thread.start()
    while not server.started:
        if not http_thread.is_alive():
            raise LmforgeError(f"cannot listen on {host}:{port}; is the port in use? choose another with --port")
        time.sleep(0.05)
    print(f"serving {model_dir} as {settings.model_name!r} on http://{host}:{port} "
          f"(OpenAI API under /v1, chat page at /){' with an API key' if settings.api_key else ''}", flush=True)
    try:
        app.fastapi.state.worker.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True
        http_thread.join(timeout=10)
