"""`lmforge serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the batching engine.

    GET  /                      a chat page (static HTML/JS shipped in the package)
    GET  /health                {"status": "ok"} (503 once the GPU is in an error state: restart the server)
    GET  /metrics               Prometheus text: requests, tokens in/out, latency histogram, queue depth
    GET  /v1/models, /v1/models/{id}
    POST /v1/completions        (stream: true → server-sent events ending with "data: [DONE]")
    POST /v1/chat/completions   (the model's chat template; streaming too)

One thread owns the engine and steps it while there is work; requests from all clients join the same
batch (their decode steps share a forward pass). A client that disconnects stops its generation.

No request can stop the server. Every field is checked against the range the engine takes, text
against what the tokenizer takes, before anything reaches the engine; and the engine isolates what
still fails, so an exception while adding or stepping one request fails that request alone. Every
error, 404 and 405 included, is an OpenAI-style body ``{"error": {"message", "type", "param", "code"}}``:
4xx for the client's mistakes, 500 for the server's.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import hmac
import itertools
import json
import logging
import os
import queue
import socket
import threading
import time
import uuid
import dataclasses
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from lmforge.errors import LmforgeError
from lmforge.infer.engine import Engine, Request, end_tokens
from lmforge.infer.generate import SamplingParams, chat_prompt
from lmforge.infer.sampling import recommended_length, recommended_sampling
from lmforge.serve.embeddings import EmbeddingBody, embeddings

API_KEY_ENV = "LMFORGE_API_KEY"
log = logging.getLogger("lmforge.serve")


MAX_BATCH = 4096  # the most sequences a server decodes together


@dataclass
class ServerSettings:
    max_batch: int = 16  # sequences decoded together
    max_queue: int = 64  # requests waiting for a row before new ones get 429
    max_tokens: int = 1024  # largest max_tokens a request may ask for
    max_n: int = 8  # largest n
    max_body_bytes: int = 1 << 20  # larger request bodies get 413
    api_key: str | None = None
    model_name: str = "lmforge"
    allow_any_model: bool = False  # False: a request naming another model gets 404 model_not_found (as OpenAI, vLLM)

    def __post_init__(self):
        for name in ("max_batch", "max_queue", "max_tokens", "max_n", "max_body_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                flag = "--" + name.removesuffix("_bytes").replace("_", "-")
                raise LmforgeError(f"{flag} must be a positive whole number, not {value!r}")
        if self.max_batch > MAX_BATCH:  # (each a row of the KV cache, allocated when the server starts)
            raise LmforgeError(f"--max-batch {self.max_batch} is too many rows decoded together: give at most "
                               f"{MAX_BATCH:,}")


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        # An error may quote what the client sent; keep it encodable whatever that was.
        message = self.message.encode("utf-8", "replace").decode("utf-8")
        return {"error": {"message": message, "type": self.type, "param": self.param, "code": self.code}}


def server_error(e: BaseException) -> APIError:
    return APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error")


def poisons_the_device(e: BaseException) -> bool:
    """Whether ``e`` leaves the GPU unusable for this process (a device-side assert, an illegal memory access):
    CUDA then fails every later call, so the server says it is unhealthy rather than fail each request. Running
    out of memory is not such an error: the step is retried with fewer rows."""
    text = str(e)
    if "out of memory" in text or "ALLOC_FAILED" in text:  # (cuBLAS and the allocator run out: the next step may not)
        return False
    return type(e).__name__ == "AcceleratorError" or "CUDA error" in text or "device-side assert" in text


# -- request bodies -------------------------------------------------------------------------------
# Every field is bounded to what the engine takes: a value that passes here never raises below.


def _valid_text(text: str) -> str:
    """Text the tokenizer and the chat template can take. JSON can carry lone surrogates ("\\ud800"),
    which no UTF-8 tokenizer encodes; NUL is refused as binary data sent as text."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("contains a lone surrogate (an unpaired \\ud800-\\udfff escape); send valid Unicode text") from None
    if "\x00" in text:
        raise ValueError("contains a NUL character (\\u0000)")
    return text


Text = Annotated[str, AfterValidator(_valid_text)]
MAX_STOPS = 16  # each stop string is searched for after every token
MAX_PROMPTS = 64  # prompts in one completion request (each is a request of the engine's)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class _Sampling(BaseModel):
    # strict: "5" is no number and true no count (a 400 saying so, not a guess); fields OpenAI does not define
    # are kept aside (model_extra) and ignored, as OpenAI-compatible servers do, but for the extensions of other
    # servers that would change the answer (refuse_unsupported)
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, strict=True)

    model: Text | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stop: Text | Annotated[list[Text], Field(max_length=MAX_STOPS)] | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    # torch.Generator takes 64 bits; sample i of n uses seed + i, so the OpenAI int64 range always fits
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    # common extensions (vLLM and others accept them too); top_k -1 is vLLM's "off"
    top_k: int = Field(default=0, ge=-1)
    min_p: float = Field(default=0.0, ge=0.0, lt=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    stop_token_ids: Annotated[list[int], Field(max_length=MAX_STOPS)] | None = None  # vLLM's: beside the end tokens
    stream_options: StreamOptions | None = None
    # vLLM's: special tokens (other than the stop token, never in the text) left out of the text, as vLLM and
    # transformers' pipelines do by default; their logprobs keep them
    skip_special_tokens: bool = True
    # OpenAI fields that change the answer and that this server does not implement: refused (400) when set to
    # anything but their no-op (see OpenAIService.refuse_unsupported), never silently dropped
    logit_bias: dict | None = None


# Request fields of other OpenAI-compatible servers (vLLM's sampling extensions) that change the answer, with
# their no-op values: this server refuses them (400) rather than answering as if they were not there.
_OTHER_EXTENSIONS = {"num_beams": 1, "use_beam_search": False, "best_of_beams": 1, "length_penalty": 1.0,
                     "early_stopping": False, "min_tokens": 0, "ignore_eos": False, "bad_words": [],
                     "allowed_token_ids": [], "include_stop_str_in_output": False, "truncate_prompt_tokens": None,
                     "chat_template": None, "chat_template_kwargs": {}, "add_generation_prompt": True,
                     "continue_final_message": False, "logits_processors": [],
                     "guided_json": None, "guided_regex": None, "guided_choice": None, "guided_grammar": None,
                     "structured_outputs": None, "no_repeat_ngram_size": 0, "min_new_tokens": 0, "typical_p": 1.0,
                     "prompt_logprobs": None}


# what the server takes of a folder's generation_config.json where a request sets none, as vLLM does (not its
# no_repeat_ngram_size or min_new_tokens, which `lmforge generate` applies as transformers does)
SERVED_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


class CompletionBody(_Sampling):
    # text, or token ids (the OpenAI API's other form, as vLLM serves it), or a list of one of them
    prompt: Text | list[Text] | Annotated[list[int], Field(min_length=1)] | list[Annotated[list[int], Field(min_length=1)]]
    logprobs: int | None = Field(default=None, ge=0, le=5)
    # 0 with echo: the prompt alone, scored (OpenAI's legacy scoring request); the field's 0 is refused otherwise
    max_tokens: int | None = Field(default=None, ge=0)
    echo: bool = False
    best_of: int | None = None
    suffix: Text | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str
    text: Text | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: Text | list[ContentPart] | None = ""


class ChatBody(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list | None = None
    tool_choice: str | dict | None = None
    functions: list | None = None
    function_call: str | dict | None = None
    response_format: dict | None = None


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
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the handler's event loop is closed (shutting down): nobody is listening
            pass


class EngineWorker:
    """Steps the engine while there is work. With ``thread`` it runs in a thread of its own; `serve`
    instead runs ``run()`` on the main thread (see ``serve``).

    Failures stay with the request that caused them: the engine isolates each request's share of a
    step (``Engine(isolate_failures=True)``), ``add`` failing fails that submission, and when the
    step's shared forward pass raises, the request admitted last is failed and the step retried.
    """

    def __init__(self, engine: Engine, settings: ServerSettings, metrics, thread: bool = True):
        self.engine, self.settings, self.metrics = engine, settings, metrics
        self.submissions: queue.Queue = queue.Queue()
        self.handles: dict[int, Handle] = {}
        self.wake = threading.Event()
        self.running = True
        self.thread = None
        self.broken: str | None = None  # the error that left the device unusable (then /health answers 503)
        if thread:
            self.thread = threading.Thread(target=self.run, name="lmforge-engine", daemon=True)
            self.thread.start()

    def queue_depth(self, more: int = 0) -> int:
        """Requests that will have to wait for a row (those arriving while rows are free do not); with ``more``
        requests beside those submitted."""
        pending = self.submissions.qsize() + len(self.engine.waiting) + more
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
            try:
                self._iterate()
            except Exception as e:  # a bug outside any one request: fail those in flight, go on
                log.error("the engine loop failed; failing the requests in flight", exc_info=e)
                self._fail_all(e)

    def _iterate(self) -> None:
        self._admit()
        for handle in [h for h in self.handles.values() if h.cancelled]:
            self.engine.abort(handle.request)
            del self.handles[handle.request.id]
        self.metrics.queue_depth.set(self.queue_depth())
        self.metrics.active.set(len(self.engine.active))
        if not self.engine.has_work:
            self.wake.wait(timeout=0.5)
            self.wake.clear()
            return
        if self.engine.active:
            self.metrics.batch.observe(len(self.engine.active))
        try:
            events = self.engine.step()
        except Exception as e:  # noqa: BLE001 (the shared part of the step; see the class docstring)
            self._fail_newest(e)
            return
        self._deliver(events)

    def _admit(self) -> None:
        while not self.submissions.empty():
            prompt_ids, params, handle = self.submissions.get()
            try:
                handle.request = self.engine.add(prompt_ids, params)
            except LmforgeError as e:  # the request's own settings (checked by the handler already)
                handle.put(APIError(400, str(e)))
                continue
            except Exception as e:
                log.error("adding a request failed", exc_info=e)
                handle.put(server_error(e))
                continue
            self.handles[handle.request.id] = handle

    def _deliver(self, events) -> None:
        finished = {}
        for event in events:
            request = event.sequence.request
            handle = self.handles.get(request.id)
            if handle is None:
                continue
            if request.error is not None:
                self._note_broken(request.error)
                log.error("a request failed while generating", exc_info=request.error)
                self._fail(request, server_error(request.error))
                continue
            if handle.stream:
                handle.put(event)
            if request.finished:
                finished[request.id] = handle
        # (after the step's every event: a request of n sequences finishes with the last of them, and the others
        # may have an event of this step after the first of its events)
        for request_id, handle in finished.items():
            handle.put(None)  # end of the request
            self.handles.pop(request_id, None)

    def _fail(self, request: Request, error: APIError) -> None:
        self.engine.abort(request)
        handle = self.handles.pop(request.id, None)
        if handle is not None:
            handle.put(error)

    def _note_broken(self, e: BaseException) -> None:
        if self.broken is None and poisons_the_device(e):
            self.broken = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            log.error("the GPU is in an error state that lasts as long as this process: /health answers 503; "
                      "restart the server")

    def _fail_newest(self, e: Exception) -> None:
        """The batched forward pass raised. The rows that stepped together before the newest request
        joined make it the likeliest cause (it also sheds load, if the step failed for lack of memory):
        fail it alone; the others retry at the next step, and if that fails too, the next newest goes."""
        self._note_broken(e)
        active = {s.request.id: s.request for s in self.engine.active if not s.finished}
        if not active:
            log.error("an engine step failed", exc_info=e)
            self._fail_all(e)
            return
        log.error("an engine step failed; failing the request admitted last", exc_info=e)
        self._fail(active[max(active)], server_error(e))  # (request ids increase)

    def _fail_all(self, e: Exception) -> None:
        self._note_broken(e)
        for handle in self.handles.values():
            handle.put(server_error(e))
        self.handles.clear()
        self.engine.active.clear()
        self.engine.waiting.clear()


class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

        disable_created_metrics()  # the *_created timestamp series only add noise here
        self.registry = CollectorRegistry()
        self.requests = Counter("lmforge_requests_total", "HTTP requests by endpoint and status (unknown paths: 'other')",
                                ["endpoint", "status"], registry=self.registry)
        self.prompt_tokens = Counter("lmforge_prompt_tokens_total", "Prompt tokens received", registry=self.registry)
        self.completion_tokens = Counter("lmforge_completion_tokens_total", "Tokens generated", registry=self.registry)
        self.latency = Histogram("lmforge_request_latency_seconds", "Time from request to last token", ["endpoint"],
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120), registry=self.registry)
        self.queue_depth = Gauge("lmforge_queue_depth", "Requests waiting for a row in the engine", registry=self.registry)
        self.active = Gauge("lmforge_active_sequences", "Sequences being decoded", registry=self.registry)
        self.batch = Histogram("lmforge_batch_size", "Sequences sharing each decode step", buckets=(1, 2, 4, 8, 16, 32, 64),
                               registry=self.registry)


# -- generation endpoints -------------------------------------------------------------------------


class OpenAIService:
    """What /v1/completions and /v1/chat/completions do: check a request, submit it, answer."""

    def __init__(self, model, tokenizer, settings: ServerSettings, metrics: Metrics, retriever=None):
        self.model, self.tokenizer, self.settings, self.metrics = model, tokenizer, settings, metrics
        self.retriever = retriever
        self.context, self.vocab_size = model.config.block_size, model.config.vocab_size
        # an encoder-decoder reads the prompt in its encoder: prompt and completion each have the whole context
        self.seq2seq = hasattr(model, "encoder") and hasattr(model, "decoder")
        self.worker: EngineWorker | None = None  # started with the app

    def check_model(self, name: str | None) -> None:
        if name is None or self.settings.allow_any_model or name == self.settings.model_name:
            return
        raise APIError(404, f"The model '{name}' does not exist; this server serves '{self.settings.model_name}' "
                            "(see /v1/models)", param="model", code="model_not_found")

    @staticmethod
    def refuse_unsupported(body: _Sampling) -> None:
        """A 400 for an OpenAI field this server does not implement, set to change the answer (its no-op values,
        which some clients send, pass): answering as if it were not there would be a silently wrong answer."""
        unsupported = [
            ("logit_bias", bool(body.logit_bias)),
            ("best_of", getattr(body, "best_of", None) not in (None, body.n)),
            ("suffix", bool(getattr(body, "suffix", None))),
            ("tools", bool(getattr(body, "tools", None))),
            ("tool_choice", getattr(body, "tool_choice", None) not in (None, "none", "auto")),
            ("functions", bool(getattr(body, "functions", None))),
            ("function_call", getattr(body, "function_call", None) not in (None, "none", "auto")),
            ("response_format", (getattr(body, "response_format", None) or {}).get("type", "text") != "text"),
        ]
        # other servers' extensions (vLLM's) that change the answer, set to anything but their no-op
        extra = body.model_extra or {}
        unsupported += [(name, name in extra and extra[name] not in (off, None)) for name, off in _OTHER_EXTENSIONS.items()]
        for name, used in unsupported:
            if used:
                raise APIError(400, f"{name} is not supported by this server; leave it out", param=name,
                               code="unsupported_parameter")

    def default_max_tokens(self, prompt_tokens: int, at_most: int | None = None) -> int:
        """Without a limit in the request, the answer may fill what the context leaves (as vLLM), within
        this server's limit and the model's generation_config.json ``max_new_tokens`` (vLLM's default too)."""
        room = self.context if self.seq2seq else self.context - prompt_tokens
        return min(self.settings.max_tokens, recommended_length(self.model) or self.context, max(room, 1),
                   at_most or self.context)

    def sampling(self, body: _Sampling, max_tokens: int, prompt_tokens: int, logprobs: int | None) -> SamplingParams:
        """The engine's settings for ``body``, refused (400) where they exceed this server or this model."""
        limits = self.settings
        self.refuse_unsupported(body)
        if max_tokens > limits.max_tokens:  # (named as the request named it: chat's newer max_completion_tokens)
            param = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
            raise APIError(400, f"{param} {max_tokens} is above this server's limit of {limits.max_tokens}",
                           param=param, code="max_tokens_too_large")
        max_n = min(limits.max_n, limits.max_batch)  # the n samples decode side by side
        if body.n > max_n:
            raise APIError(400, f"n {body.n} is above this server's limit of {max_n}", param="n", code="n_too_large")
        if logprobs is not None and logprobs > self.vocab_size:
            param = "top_logprobs" if isinstance(body, ChatBody) else "logprobs"
            raise APIError(400, f"{param} {logprobs} is above the model's vocabulary of {self.vocab_size}", param=param)
        if self.seq2seq and max(prompt_tokens, max_tokens) > self.context:
            # (the encoder reads the prompt with an end token after it, as the engine gives it: fit_source)
            raise APIError(400, f"This model reads up to {self.context} tokens (the prompt and its end token) and writes "
                                f"up to {self.context}; the prompt is {prompt_tokens} with its end token and you asked "
                                f"for {max_tokens}. Please reduce the prompt or the completion length.", param="prompt",
                           code="context_length_exceeded")
        if not self.seq2seq and prompt_tokens + max_tokens > self.context:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens. However, you requested "
                                f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} for the "
                                f"completion). Please reduce the prompt or the completion length.",
                           param="messages" if isinstance(body, ChatBody) else "prompt", code="context_length_exceeded")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        stop_ids = None  # (the model's end tokens)
        if body.stop_token_ids:  # vLLM's meaning: these too, beside the end tokens
            bad = [i for i in body.stop_token_ids if not 0 <= i < self.vocab_size]
            if bad:
                raise APIError(400, f"stop_token_ids: {bad[0]} is no token id of this model (0 to {self.vocab_size - 1})",
                               param="stop_token_ids")
            stop_ids = sorted(set(end_tokens(self.model, self.tokenizer)) | set(body.stop_token_ids))
        # what the request leaves out: what the model's generation_config.json recommends (as vLLM does), else
        # OpenAI's defaults
        chosen = {**recommended_sampling(self.model), **{k: getattr(body, k) for k in body.model_fields_set}}
        chosen = {k: chosen.get(k, getattr(body, k)) for k in SERVED_SAMPLING}
        return SamplingParams(max_new_tokens=max_tokens, temperature=chosen["temperature"], top_p=chosen["top_p"],
                              top_k=max(chosen["top_k"], 0), min_p=chosen["min_p"],
                              repetition_penalty=chosen["repetition_penalty"],
                              frequency_penalty=body.frequency_penalty, presence_penalty=body.presence_penalty,
                              n=body.n, stop=[s for s in stop if s], stop_token_ids=stop_ids, seed=body.seed,
                              logprobs=logprobs, skip_special_tokens=body.skip_special_tokens)

    async def run(self, http: HTTPRequest, prompt_ids: list[int], params: SamplingParams, stream_fn, final_fn,
                  endpoint: str):
        """Submit, then either stream events as SSE or collect them; aborts when the client leaves."""
        handle = Handle(asyncio.get_running_loop(), stream=stream_fn is not None)
        self.worker.submit(prompt_ids, params, handle)
        self.metrics.prompt_tokens.inc(len(prompt_ids))
        started = time.perf_counter()

        def done() -> None:
            if handle.request is not None:
                self.metrics.completion_tokens.inc(sum(len(s.tokens) for s in handle.request.sequences))
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)

        if stream_fn is not None:
            return StreamingResponse(self._sse(handle, stream_fn, done), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            while True:  # wait for the end of the request, checking that the client is still there
                try:
                    item = await asyncio.wait_for(handle.events.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        self.worker.cancel(handle)
                        raise APIError(499, "client closed the request", code="client_closed") from None
                    continue
                if isinstance(item, APIError):
                    raise item
                if item is None:
                    break
        finally:
            done()
        return final_fn(handle.request)

    async def _sse(self, handle: Handle, stream_fn, done):
        async def events():
            while (item := await handle.events.get()) is not None:
                if isinstance(item, APIError):
                    raise item
                yield item

        try:
            async for chunk in stream_fn(events()):
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"
        except APIError as e:  # the status line has gone: the error is the stream's last event
            yield f"data: {json.dumps(e.body())}\n\n"
        except Exception as e:
            log.error("a stream failed", exc_info=e)
            yield f"data: {json.dumps(server_error(e).body())}\n\n"
        finally:
            if handle.request is None or not handle.request.finished:
                self.worker.cancel(handle)  # the client went away: stop generating for it
            done()

    def usage(self, request: Request) -> dict:
        completion = sum(len(s.tokens) for s in request.sequences)
        return {"prompt_tokens": len(request.prompt_ids), "completion_tokens": completion,
                "total_tokens": len(request.prompt_ids) + completion}

    def token_text(self, token: int) -> str:
        """How log-probabilities name ``token``, as OpenAI's API does: its text, or, where its bytes are no whole
        UTF-8 text (a piece of a multi-byte character, which decode() writes as U+FFFD), "bytes:\\xe2\\x80"; an
        id the tokenizer has no token for (a padded vocabulary) is "token_id:ID", as vLLM names ids. Tokens that
        differ are named differently, so that none hides another among a position's top log-probabilities."""
        if token >= self.tokenizer.vocab_size:
            return f"token_id:{token}"
        raw = self.tokenizer.token_bytes(token)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    async def completions(self, body: CompletionBody, http: HTTPRequest):
        self.check_model(body.model)
        given = body.prompt
        prompts = [given] if isinstance(given, str) or (given and isinstance(given[0], int)) else given
        if not prompts:
            raise APIError(400, "prompt is an empty list; send a prompt", param="prompt")
        if body.echo and body.logprobs is not None and self.seq2seq:
            raise APIError(400, "logprobs with echo (log-probabilities of the prompt's tokens too) need a decoder; this "
                                "model is an encoder-decoder, which reads its prompt without predicting it; ask for one "
                                "or the other", param="echo", code="unsupported_parameter")
        if len(prompts) > 1 and body.stream:
            raise APIError(400, "a stream answers one prompt; send the prompts one request each, or without stream",
                           param="prompt")
        most = min(MAX_PROMPTS, self.settings.max_batch + self.settings.max_queue)
        if len(prompts) > most:
            raise APIError(400, f"{len(prompts)} prompts in one request; this server takes at most {most}",
                           param="prompt")
        rid, model_name = f"cmpl-{uuid.uuid4().hex[:24]}", self.settings.model_name
        # every prompt checked (and its settings made) before any is submitted
        plans = [self._completion_plan(body, prompt, rid, model_name) for prompt in prompts]
        if len(plans) == 1:
            prompt_ids, params, stream, final = plans[0]
            return await self.run(http, prompt_ids, params, stream if body.stream else None, final, "/v1/completions")
        # several prompts (the OpenAI API's list): each a request of its own, decoded side by side; choice
        # p * n + i is sample i of prompt p, as OpenAI numbers them. All wait in the queue or none does.
        if self.worker.queue_depth(more=len(plans)) > self.settings.max_queue:
            raise APIError(429, f"the server's queue has no room for {len(plans)} prompts now; retry shortly",
                           "rate_limit_error", code="queue_full")
        answers = await asyncio.gather(*(self.run(http, ids, params, None, final, "/v1/completions")
                                         for ids, params, _, final in plans), return_exceptions=True)
        failed = next((a for a in answers if isinstance(a, BaseException)), None)
        if failed is not None:
            raise failed
        choices = [{**c, "index": p * body.n + c["index"]} for p, answer in enumerate(answers) for c in answer["choices"]]
        usage = {k: sum(a["usage"][k] for a in answers) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
        return {**answers[0], "choices": choices, "usage": usage}

    def _completion_plan(self, body: CompletionBody, prompt: str | list[int], rid: str, model_name: str):
        """(prompt ids, sampling settings, stream function, final function) of one prompt of a completion request."""
        if isinstance(prompt, list):  # token ids, read as they are (as vLLM does: nothing added)
            prompt_ids = list(prompt)
            bad = next((i for i in prompt_ids if not 0 <= i < self.vocab_size), None)
            if bad is not None:
                raise APIError(400, f"prompt: {bad} is no token id of this model (0 to {self.vocab_size - 1})",
                               param="prompt")
            prompt = self.tokenizer.decode(prompt_ids)
        else:
            # plain text, as vLLM and transformers encode it (the tokenizer's leading special tokens: Llama's <s>)
            prompt_ids = self.tokenizer.encode(prompt) if self.seq2seq else self.tokenizer.encode_prompt(prompt)
        scoring = body.max_tokens == 0  # (the engine decodes one token, which the answer leaves out)
        if scoring and not body.echo:
            raise APIError(400, "max_tokens 0 writes nothing; with echo it returns the prompt (and with logprobs the "
                                "log-probabilities of its tokens)", param="max_tokens")
        max_tokens = 1 if scoring else body.max_tokens or self.default_max_tokens(max(len(prompt_ids), 1), 16)  # OpenAI's: 16
        # (an encoder-decoder reads the prompt and an end token: the engine's fit_source)
        if self.seq2seq:
            eos = self.tokenizer.eos_id
            read = len(prompt_ids) + (eos is not None and (not prompt_ids or prompt_ids[-1] != eos))
        else:
            read = max(len(prompt_ids), 1)
        params = self.sampling(body, max_tokens, read, body.logprobs)
        if body.echo and body.logprobs is not None:
            # the prompt's tokens are scored too, as OpenAI's API does (scorers such as lm-evaluation-harness's
            # local-completions sum them: echo, logprobs 1, max_tokens 1)
            params = dataclasses.replace(params, prompt_logprobs=body.logprobs)
        prefix = prompt if body.echo else ""

        token_texts: dict[int, list[str]] = {}
        token_widths: dict[int, list[int]] = {}  # what each token adds to the text (a left-out special token: 0)
        skipped = self.tokenizer.special_ids if body.skip_special_tokens else set()

        def named(alternatives) -> dict | None:
            return {self.token_text(t): v for t, v in alternatives} if alternatives else None

        def legacy_logprobs(seq, start: int = 0, end: int | None = None, whole: bool = False) -> dict | None:
            """Log-probabilities of ``seq``'s tokens ``start:end``; ``whole`` (the final answer): of all of them, after
            the echoed prompt's (with echo) and with the stop token that ended it, if any, as OpenAI's API lists it."""
            if body.logprobs is None:
                return None
            if scoring:
                return prompt_logprobs(seq.request)
            end = len(seq.tokens) if end is None else end
            # each token's character offset in the text returned (the echoed prompt, then the completion); the
            # token texts of a sequence are kept, so that a stream's chunks do not decode its tokens again
            texts, widths = token_texts.setdefault(seq.index, []), token_widths.setdefault(seq.index, [])
            new = seq.tokens[len(texts):end]
            texts += [self.token_text(t) for t in new]
            widths += [0 if t in skipped else len(self.tokenizer.decode([t])) for t in new]
            offsets = list(itertools.accumulate(widths[start : end - 1], initial=len(prefix) + sum(widths[:start])))
            out = {"tokens": texts[start:end], "token_logprobs": seq.logprobs[start:end],
                   "top_logprobs": [named(alts) for alts in seq.top_logprobs[start:end]],
                   "text_offset": offsets[: end - start]}
            if whole and body.echo:
                out = {k: prompt_logprobs(seq.request)[k] + v for k, v in out.items()}
            if whole and body.echo and seq.stop_logprob is not None:
                # (what a scorer's [context:-1] slice drops: without it, the slice would cut the prompt's last token)
                stop = {"tokens": self.token_text(seq.stop_token), "token_logprobs": seq.stop_logprob[0],
                        "top_logprobs": named(seq.stop_logprob[1]), "text_offset": len(prefix) + len(seq.text)}
                out = {k: v + [stop[k]] for k, v in out.items()}
            return out

        def prompt_logprobs(request: Request) -> dict:
            """The echoed prompt's tokens in ``legacy_logprobs``' form: the first token's log-probability None."""
            ids, scored = request.prompt_ids, request.prompt_logprobs or [None] * len(request.prompt_ids)
            widths = [0 if t in skipped else len(self.tokenizer.decode([t])) for t in ids]
            return {"tokens": [self.token_text(t) for t in ids],
                    "token_logprobs": [None if e is None else e[0] for e in scored],
                    "top_logprobs": [None if e is None else named(e[1]) for e in scored],
                    "text_offset": list(itertools.accumulate(widths[:-1], initial=0))[: len(ids)]}

        def chunk(choice: dict) -> dict:
            return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name,
                    "choices": [choice]}

        async def stream(events):
            request, written = None, [0] * body.n  # tokens of each sequence sent so far
            async for ev in events:
                seq = ev.sequence
                if prefix and request is None:  # (once the prompt has been read: its log-probabilities with it)
                    echoed = prompt_logprobs(seq.request) if body.logprobs is not None else None
                    for i in range(body.n):
                        yield chunk({"text": prefix, "index": i, "logprobs": echoed, "finish_reason": None})
                request = seq.request
                if scoring:  # (the prompt was all: each choice ends with it)
                    if ev.finished:
                        yield chunk({"text": "", "index": seq.index, "logprobs": None, "finish_reason": "length"})
                    continue
                i = _appended_index(ev, written)
                lp = legacy_logprobs(seq, i, i + 1) if i is not None else None
                if ev.text or ev.finished or lp:
                    yield chunk({"text": ev.text, "index": seq.index, "logprobs": lp,
                                 "finish_reason": _reason(seq) if ev.finished else None})
            if body.stream_options and body.stream_options.include_usage and request is not None:
                yield {**chunk({}), "choices": [], "usage": usage(request)}

        def usage(request: Request) -> dict:
            counts = self.usage(request)
            return {**counts, "completion_tokens": 0, "total_tokens": counts["prompt_tokens"]} if scoring else counts

        def final(request: Request):
            return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name,
                    "choices": [{"text": prefix + ("" if scoring else s.text), "index": s.index,
                                 "logprobs": legacy_logprobs(s, whole=True),
                                 "finish_reason": "length" if scoring else _reason(s)} for s in request.sequences],
                    "usage": usage(request)}

        return prompt_ids, params, stream, final

    async def chat(self, body: ChatBody, http: HTTPRequest):
        self.check_model(body.model)
        if self.seq2seq:
            raise APIError(400, "This model is an encoder-decoder without a chat template; use /v1/completions",
                           param="messages", code="chat_not_supported")
        if body.top_logprobs and not body.logprobs:  # (as OpenAI's API and vLLM answer; it was silently left out)
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": _text_of(m.content)}
                    for m in body.messages]
        extra = {}  # with an index: the passages the answer came from, a field OpenAI clients ignore
        if self.retriever is not None:
            grounding = await asyncio.to_thread(self.retriever.ground, messages)
            routed = {"intent": grounding.intent} if grounding.intent is not None else {}
            if grounding.refusal:
                return self.canned(body, grounding.refusal, routed)
            messages, extra = grounding.messages, {"sources": grounding.sources(), **routed}
        prompt, with_stops = chat_prompt(self.tokenizer, messages, SamplingParams(), self.model)
        prompt_ids = self.tokenizer.encode(prompt)
        max_tokens = body.max_completion_tokens or body.max_tokens or self.default_max_tokens(len(prompt_ids))
        params = self.sampling(body, max_tokens, len(prompt_ids), (body.top_logprobs or 0) if body.logprobs else None)
        if with_stops.stop_token_ids is not None:  # (the end of a turn too; with the request's own, if any)
            params.stop_token_ids = sorted(set(with_stops.stop_token_ids) | set(params.stop_token_ids or []))
        params.stop = params.stop + [s for s in with_stops.stop if s not in params.stop]
        rid, model_name = f"chatcmpl-{uuid.uuid4().hex[:24]}", self.settings.model_name

        def chat_logprobs(seq, start: int = 0, end: int | None = None) -> dict | None:
            if not body.logprobs:
                return None
            content = []
            for t, v, alts in zip(seq.tokens[start:end], seq.logprobs[start:end], seq.top_logprobs[start:end]):
                content.append({**self._token_entry(t, v),
                                "top_logprobs": [self._token_entry(a, w) for a, w in (alts or [])]})
            return {"content": content}

        def chunk(choices: list[dict], **extra) -> dict:
            return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model_name,
                    "choices": choices, **extra}

        async def stream(events):
            for i in range(body.n):
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
            last_request, written = None, [0] * body.n  # tokens of each sequence sent so far
            async for ev in events:
                seq = ev.sequence
                last_request = seq.request
                i = _appended_index(ev, written)
                lp = chat_logprobs(seq, i, i + 1) if i is not None else None
                if ev.text or lp:
                    yield chunk([{"index": seq.index, "delta": {"content": ev.text}, "logprobs": lp, "finish_reason": None}])
                if ev.finished:
                    yield chunk([{"index": seq.index, "delta": {}, "logprobs": None, "finish_reason": _reason(seq)}],
                                **extra)
            if body.stream_options and body.stream_options.include_usage and last_request is not None:
                yield chunk([], usage=self.usage(last_request))

        def final(request: Request):
            return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model_name,
                    "choices": [{"index": s.index, "message": {"role": "assistant", "content": s.text},
                                 "logprobs": chat_logprobs(s), "finish_reason": _reason(s)} for s in request.sequences],
                    "usage": self.usage(request), **extra}

        return await self.run(http, prompt_ids, params, stream if body.stream else None, final, "/v1/chat/completions")

    def canned(self, body: ChatBody, text: str, extra: dict):
        """A fixed answer (no passage of the index was close enough, or intent routing's), shaped as a generated one."""
        rid, created, name = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), self.settings.model_name
        if not body.stream:
            return {"id": rid, "object": "chat.completion", "created": created, "model": name,
                    "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                                 "finish_reason": "stop"} for i in range(body.n)],
                    "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}, "sources": [], **extra}

        def events():
            for i in range(body.n):
                for delta, reason in (({"role": "assistant", "content": ""}, None), ({"content": text}, None),
                                      ({}, "stop")):
                    chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                             "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}]}
                    yield f"data: {json.dumps({**chunk, **({'sources': [], **extra} if reason else {})})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    def _token_entry(self, token: int, logprob: float) -> dict:
        return {"token": self.token_text(token), "logprob": logprob, "bytes": list(self.tokenizer.token_bytes(token))}


def _reason(seq) -> str:
    return "length" if seq.finish_reason == "length" else "stop"


def _appended_index(event, written: list[int]) -> int | None:
    """The position of the token ``event`` appended to its sequence (None: it appended none), counted by the
    stream itself in ``written``: the engine may have run ahead of the stream, so the sequence's last token need
    not be this event's."""
    if not event.appended:
        return None
    index = written[event.sequence.index]
    written[event.sequence.index] += 1
    return index


def _text_of(content: str | list[ContentPart] | None) -> str:
    """A message's text: a string, or the text parts of a list of content parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if any(part.type != "text" or part.text is None for part in content):
        raise APIError(400, "only text content parts are supported", param="messages", code="unsupported_content")
    return "".join(part.text for part in content)


# -- the app --------------------------------------------------------------------------------------


def create_app(model, tokenizer, settings: ServerSettings | None = None, compile: bool = False, engine_thread: bool = True,
               embedder=None, retriever=None):
    """The FastAPI application serving ``model``; its engine worker starts with it (in a thread of its
    own, or, without ``engine_thread``, waiting for the caller to ``run()`` it). ``embedder`` (an
    ``Embedder``) answers /v1/embeddings; with no ``model`` the server answers only that. With a ``retriever``
    (an index) chat answers come from retrieved passages and carry them as ``sources``."""
    from contextlib import asynccontextmanager

    settings = settings or ServerSettings()
    metrics = Metrics()
    service = None
    if model is not None:
        engine = Engine(model, tokenizer, max_batch=settings.max_batch, compile=compile, isolate_failures=True)
        service = OpenAIService(model, tokenizer, settings, metrics, retriever)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        app.state.worker = None
        if service is not None:
            service.worker = app.state.worker = EngineWorker(engine, settings, metrics, thread=engine_thread)
        yield
        if service is not None:
            service.worker.stop()

    def generator() -> OpenAIService:
        if service is None:
            raise APIError(400, f"this server has no generator: it serves embeddings from '{embedder.name}' "
                                f"(POST /v1/embeddings); start it with a decoder or T5 --model to generate",
                           code="no_generator")
        return service

    app = FastAPI(title="lmforge", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.metrics = metrics
    _add_error_handlers(app)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return resources.files("lmforge.serve").joinpath("static/chat.html").read_text(encoding="utf-8")

    @app.get("/health")
    async def health():
        worker = app.state.worker
        if worker is not None and worker.broken:  # (a supervisor restarts the server on this)
            return JSONResponse({"status": "error", "error": f"the GPU failed ({worker.broken}); restart the server"},
                                status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def served_models() -> list[dict]:
        served = []
        if service is not None:
            served.append({"id": settings.model_name, "object": "model", "created": created, "owned_by": "lmforge",
                           "max_model_len": service.context})
        if embedder is not None:
            served.append({"id": embedder.name, "object": "model", "created": created, "owned_by": "lmforge",
                           "max_model_len": embedder.max_length})
        return served

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": served_models()}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):  # (the openai client's models.retrieve)
        served = {m["id"]: m for m in served_models()}
        if name not in served:
            raise APIError(404, f"The model '{name}' does not exist; this server serves {', '.join(map(repr, served))}",
                           param="model", code="model_not_found")
        return served[name]

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: HTTPRequest):
        return await generator().completions(body, http)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, http: HTTPRequest):
        return await generator().chat(body, http)

    def check_embedding_model(name: str | None) -> None:
        if name is None or settings.allow_any_model or name == embedder.name:
            return
        raise APIError(404, f"The model '{name}' does not exist; this server embeds with '{embedder.name}' "
                            "(see /v1/models)", param="model", code="model_not_found")

    @app.post("/v1/embeddings")
    async def embeddings_endpoint(body: EmbeddingBody):
        if embedder is None:
            raise APIError(400, "this server has no embedding model; start it with --embedding-model ENCODER "
                                "(or serve an encoder folder as --model)", code="no_embedding_model")
        return await embeddings(body, embedder, check_embedding_model,
                                lambda message, param, code="invalid_value": APIError(400, message, param=param, code=code))

    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as OpenAI's body: the app's own, FastAPI's validation and routing errors, the rest."""

    def respond(e: APIError, headers: dict | None = None) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(APIError)
    async def api_error(_request, e: APIError):
        return respond(e)

    @app.exception_handler(LmforgeError)
    async def user_error(_request, e: LmforgeError):  # (say, a chat template refusing the messages)
        return respond(APIError(400, str(e)))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: HTTPRequest, e: RequestValidationError):
        content_type = request.headers.get("content-type")
        if not _is_json(content_type):  # FastAPI then leaves the body unparsed
            got = f"got {content_type[:100]!r}" if content_type else "no Content-Type header"
            return respond(APIError(415, f"send the body as JSON with 'Content-Type: application/json' ({got})",
                                    code="unsupported_media_type"))
        errors = e.errors() or [{}]
        # Of a union's branches (stop: a string or a list), the one that got the type right, or got
        # furthest into the value, says most.
        first = max(errors, key=lambda x: (not x.get("type", "").endswith("_type"), len(x.get("loc", ()))))
        if first.get("type") == "json_invalid":
            return respond(APIError(400, "the request body is not valid JSON", code="invalid_json"))
        param = _param(first.get("loc", ())[1:])
        message = first.get("msg", "invalid value").removeprefix("Value error, ")
        return respond(APIError(400, f"{param or 'body'}: {message}", param=param, code="invalid_value"))

    @app.exception_handler(HTTPException)
    async def http_error(request: HTTPRequest, e: HTTPException):
        if e.status_code == 404:
            error = APIError(404, f"Invalid URL ({request.method} {request.url.path}); the API is under /v1",
                             code="unknown_url")
        elif e.status_code == 405:
            error = APIError(405, f"{request.method} is not allowed on {request.url.path}; use {e.headers.get('Allow')}",
                             code="method_not_allowed")
        elif e.status_code == 400:  # FastAPI could not read the body (not UTF-8, nested too deep, ...)
            error = APIError(400, "the request body is not valid JSON (not UTF-8, or nested too deep)", code="invalid_json")
        else:
            status = e.status_code if 400 <= e.status_code < 600 else 500
            error = APIError(status, str(e.detail), "invalid_request_error" if status < 500 else "server_error")
        return respond(error, e.headers)

    @app.exception_handler(Exception)
    async def unexpected(_request, e: Exception):
        return respond(server_error(e))


def _param(loc) -> str | None:
    """A field's path as OpenAI writes it ("messages.0.content"), without pydantic's union branches
    ("function-after[_valid_text(), str]", "list[ContentPart]", "str")."""
    branches = {"str", "int", "float", "bool", "list", "dict", "none"}
    parts = [str(p) for p in loc if isinstance(p, int) or (str(p).isidentifier() and p not in branches)]
    return ".".join(parts) or None


def _is_json(content_type: str | None) -> bool:
    kind = (content_type or "").split(";")[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


class AuthAndCount:
    """ASGI middleware, outermost: the API key on /v1 (compared in constant time), and request counts
    by endpoint and status, rejections (401, 413, 429, ...) included. Paths the app does not serve
    share the label "other", so that no client can grow the metrics without bound.

    (Plain ASGI rather than Starlette's BaseHTTPMiddleware, which interferes with streamed responses'
    disconnect detection.)
    """

    def __init__(self, app, settings: ServerSettings, metrics: Metrics, paths: set[str]):
        self.app, self.settings, self.metrics, self.paths = app, settings, metrics, paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        label = path if path in self.paths else "other"
        if self.settings.api_key and path.startswith("/v1/"):
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, f"Bearer {self.settings.api_key}".encode()):
                self.metrics.requests.labels(label, "401").inc()
                error = APIError(401, "missing or wrong API key; send Authorization: Bearer <key>", code="invalid_api_key")
                return await send_error(send, error)

        async def counting_send(message):
            if message["type"] == "http.response.start" and path != "/metrics":
                self.metrics.requests.labels(label, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


async def send_error(send, error: APIError) -> None:
    body = json.dumps(error.body()).encode()
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


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
        await send_error(send, APIError(413, f"the request body is larger than {self.limit} bytes", code="body_too_large"))


def build_server_app(model, tokenizer, settings: ServerSettings, compile: bool = False, engine_thread: bool = True,
                     embedder=None, retriever=None):
    """The app with its ASGI middleware: API key and counting outside, then the body size limit."""
    app = create_app(model, tokenizer, settings, compile, engine_thread, embedder, retriever)
    paths = {route.path for route in app.routes}
    wrapped = AuthAndCount(BodyLimit(app, settings.max_body_bytes), settings, app.state.metrics, paths)
    wrapped.fastapi = app
    return wrapped


def _is_encoder_folder(model_dir) -> bool:
    from lmforge.model.checkpoint import resolve_model_dir

    config = resolve_model_dir(model_dir) / "config.json"
    try:
        hf = json.loads(config.read_text(encoding="utf-8")) if config.exists() else {}
    except (OSError, ValueError):
        return False  # (the loader then says what is wrong with the folder)
    return isinstance(hf, dict) and hf.get("model_type") == "bert"


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on ``host:port``, opened before the model loads so that a bad address or a
    busy port is a one-line error at once (uvicorn would log a traceback, then blame the port)."""
    if not 0 <= port <= 65535:
        raise LmforgeError(f"--port {port} is not a port number; use 1 to 65535 (or 0 for any free port)")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise LmforgeError(f"--host {host!r} is not an address of this machine ({e})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: restart at once on the same port
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise LmforgeError(f"port {port} on {host} is in use (another server?); choose another with --port, "
                               f"for example --port {_free_port(family, host)}") from None
        if e.errno == errno.EACCES:
            raise LmforgeError(f"no permission to listen on port {port} (ports below 1024 need privileges); "
                               "choose another with --port") from None
        raise LmforgeError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


def _free_port(family, host: str) -> int:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def serve(model_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, settings: ServerSettings | None = None,
          int8: bool = False, device: str = "auto", compile: bool = False, dtype: str = "auto",
          embedding_model: str | os.PathLike | None = None, retriever=None) -> None:
    """Load ``model_dir`` (weights in ``dtype``: auto, float32, bfloat16, float16) and serve it until interrupted;
    an encoder folder (as ``model_dir`` or ``embedding_model``) answers /v1/embeddings."""
    settings = settings or ServerSettings()
    sock = listen(host, port)  # before the model loads: a busy port is known at once
    try:
        _serve_on(sock, model_dir, settings, int8, device, compile, dtype, embedding_model, retriever)
    finally:
        sock.close()


def _serve_on(sock: socket.socket, model_dir, settings: ServerSettings, int8: bool, device: str, compile: bool,
              dtype: str = "auto", embedding_model=None, retriever=None) -> None:
    import sys

    import uvicorn

    from lmforge.model.checkpoint import load_generator, load_tokenizer_for, weights_precision
    from lmforge.utils import pick_device

    from lmforge.serve.embeddings import Embedder

    settings.api_key = settings.api_key or os.environ.get(API_KEY_ENV) or None
    device = pick_device(device, int8)
    model = tokenizer = embedder = None
    if _is_encoder_folder(model_dir):  # an encoder serves embeddings only
        if embedding_model is not None:
            raise LmforgeError(f"{model_dir} is an encoder: it serves /v1/embeddings itself; drop --embedding-model "
                               f"or give a decoder or T5 --model")
        if int8:
            raise LmforgeError("--int8 quantises decoders only; drop it for an encoder")
        embedding_model = model_dir
    else:
        precision = weights_precision(model_dir, device, "float32" if int8 else dtype)  # int8 quantises fp32 weights
        if precision.news:
            print(f"precision: {precision.reason}", flush=True)
        model = load_generator(model_dir, device, precision.torch_dtype)
        tokenizer = load_tokenizer_for(model)
        applied = {k: v for k, v in recommended_sampling(model).items() if k in SERVED_SAMPLING}
        if applied:
            from lmforge.infer.sampling import describe_sampling

            print(f"sampling: {describe_sampling(applied)} where a request sets none, as "
                  f"{getattr(model, 'base_source', None) or model.source}/generation_config.json recommends", flush=True)
    if embedding_model is not None:
        embedder = Embedder(embedding_model, device)
    if int8:
        from lmforge.infer.engine import quantize_int8

        model = quantize_int8(model)
    elif model is not None:
        from lmforge.model.gpt import use_fast_kernels

        chosen = use_fast_kernels(model, settings.max_batch, pack=not compile)  # weights on the CPU
        if chosen != "as loaded":
            print(f"products: {chosen} (measured fastest on this CPU)", flush=True)
    if settings.model_name == "lmforge":
        settings.model_name = Path(model_dir).resolve().name
    if model is None:
        embedder.name = settings.model_name  # (--name names the one model this server has)
    if retriever is not None and model is None:
        raise LmforgeError("--index answers chat from passages: give a decoder --model to answer with")
    app = build_server_app(model, tokenizer, settings, compile, engine_thread=False, embedder=embedder,
                           retriever=retriever)
    # The engine runs here, on the main thread, which already ran the model's first torch operations;
    # uvicorn (which only tokenizes) gets a thread. Torch ops on a second thread run ~3x slower on small
    # CPUs, because the main thread's idle OpenMP team keeps spinning (measured: 341 vs 115 ms).
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    sys.setswitchinterval(0.0005)  # hand the GIL back to the engine sooner than every 5 ms
    http_thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="lmforge-http", daemon=True)
    http_thread.start()
    while not server.started:
        if not http_thread.is_alive():
            raise LmforgeError("the HTTP server did not start (see the messages above)")
        time.sleep(0.05)
    host, port = sock.getsockname()[:2]
    url_host = f"[{host}]" if ":" in host else host
    what = "(OpenAI API under /v1, chat page at /)" if model is not None else "(POST /v1/embeddings)"
    also = f", embeddings from {embedder.name!r}" if model is not None and embedder is not None else ""
    print(f"serving {model_dir} as {settings.model_name!r}{also} on http://{url_host}:{port} "
          f"{what}{' with an API key' if settings.api_key else ''}", flush=True)
    try:
        if app.fastapi.state.worker is not None:
            app.fastapi.state.worker.run()
        else:
            http_thread.join()
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True
        http_thread.join(timeout=10)
