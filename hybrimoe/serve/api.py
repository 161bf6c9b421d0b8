"""The OpenAI-compatible HTTP API over the engine (FastAPI; streaming through sse-starlette).

Design choices:
- Requests are validated strictly (pydantic, no type coercion) and against the model (its name,
  its positions), before they are queued; every refusal is OpenAI's error object with a 4xx
  status: 400 for a bad request (malformed JSON included), 404 for an unknown model, 503 with
  `Retry-After` when the waiting queue is full or the server is stopping.
- A handler tokenizes, submits and reads the engine's deliveries from an asyncio queue (the engine
  thread hands them over with `call_soon_threadsafe`). A client that goes away cancels its
  request: a stream's generator is closed by sse-starlette; a plain request is watched for the
  disconnect while it waits. On SIGINT/SIGTERM the requests in flight go on until they end or
  their time to finish is up (`Shutdown`); then each is told (a 503, or an error event).
- Chat prompts come from the tokenizer's chat template; a tokenizer without one (the demo model's)
  gets a plain one: each message as "ROLE:" and its text, then "ASSISTANT:".
- Fields OpenAI defines that this server does not implement (logprobs, echo, tools, penalties...)
  are refused with a 400 unless they hold the value that means "not used"; other unknown fields are
  ignored. `n` other than 1 is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Literal

from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from hybrimoe.errors import UserError
from hybrimoe.run import max_prompt_chars
from hybrimoe.run_options import MAX_TEMPERATURE, Sampling
from hybrimoe.serve.engine import SHUTTING_DOWN, Done, Engine, Piece, QueueFull, Request, ShuttingDown
from hybrimoe.serve.metrics import ServerMetrics

MAX_STOP_STRINGS = 4  # as OpenAI's API
RETRY_AFTER_S = 1
MAX_BODY_BYTES = 16 * 2**20  # a request body past this is refused unread (its JSON and tokens would hold the loop)
DRAIN_S = 2.0  # how long a refused body is read before the answer goes out anyway
BODY_WAIT_S = 30.0  # the longest a request body may pause before it is refused (a client that never sends it)
ANSWER_S = 2.0  # after the requests' time to finish, for their answers to go out
_POLL_S = 0.25  # how often a waiting handler looks for its client's disconnect and the shutdown's deadline


class Shutdown:
    """When the server was asked to stop; a request still running `timeout_s` later is cancelled
    and told (the HTTP server's own limit, which drops connections, is `ANSWER_S` later)."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.started_s: float | None = None

    def begin(self) -> None:
        if self.started_s is None:
            self.started_s = time.monotonic()

    def overdue(self) -> bool:
        return self.started_s is not None and time.monotonic() > self.started_s + self.timeout_s


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    include_usage: bool = False  # a last chunk with the token counts (and no choices)


# OpenAI request fields this server does not implement, with the values that mean "not used":
# anything else is refused rather than silently ignored
_UNSUPPORTED_UNLESS = {
    "logprobs": (None, False), "top_logprobs": (None,), "echo": (None, False), "best_of": (None, 1),
    "suffix": (None, ""), "logit_bias": (None, {}), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
}


# OpenAI request fields that change nothing a server computes (bookkeeping for OpenAI's own
# platform): accepted and ignored. Any other field this server does not know is refused.
_IGNORED_FIELDS = ("user", "metadata", "store", "service_tier", "parallel_tool_calls")


class _Sampled(BaseModel):
    """The fields both endpoints share."""

    model_config = ConfigDict(strict=True, extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data):
        if isinstance(data, dict):
            for name, unused in _UNSUPPORTED_UNLESS.items():
                given = data[name] if name in data else None
                if not any(given == value and isinstance(given, bool) == isinstance(value, bool) for value in unused):
                    raise ValueError(f"{name} is not supported by this server")
            known = cls.model_fields.keys() | _UNSUPPORTED_UNLESS.keys() | set(_IGNORED_FIELDS)
            unknown = sorted(str(name) for name in data if name not in known)
            if unknown:
                raise ValueError(f"unrecognized request argument: {unknown[0]}")
            if data.get("max_tokens") is not None and data.get("max_completion_tokens") is not None:
                raise ValueError("give max_tokens or max_completion_tokens, not both")
        return data

    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=MAX_TEMPERATURE)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)

    @field_validator("temperature", "top_p")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if any(not s for s in stops):
            raise ValueError("a stop string must not be empty")
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
        return value

    @model_validator(mode="after")
    def _stream_options_need_a_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def sampling(self) -> Sampling:
        return Sampling(temperature=self.temperature, top_p=self.top_p, seed=self.seed)


class CompletionRequest(_Sampled):
    prompt: str | list[str]  # OpenAI's list form, of one prompt: a request is answered with one completion

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str:
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError(f"one prompt per request (n is 1), got a list of {len(value)}")
            value = value[0]
        if not value:
            raise ValueError("the prompt is empty")
        return value


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]  # developer: OpenAI's newer name for system
    content: str | list[TextPart]
    name: str | None = None

    def for_template(self) -> dict[str, str]:
        """The message as chat templates take it: text content, the developer's role as system."""
        text = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(_Sampled):
    messages: list[Message] = Field(min_length=1)


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)

    async def __call__(self, scope, receive, send) -> None:  # answered as an ASGI app, before routing
        await self.response()(scope, receive, send)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """The first validation error in one line, and the field it is about."""
    error = exc.errors()[0]
    where = [str(part) for part in error.get("loc", ()) if part != "body"]
    if error.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    if not where and error.get("type") == "model_attributes_type":  # a body not parsed as JSON: text, or no type
        return "the request body must be a JSON object, sent as Content-Type: application/json", None
    field = ".".join(where) or None
    return (f"{field}: {error.get('msg')}" if field else str(error.get("msg"))), field


def plain_chat_prompt(messages: list[dict[str, str]]) -> str:
    """The demo model's chat prompt (it has no template): "ROLE:\\ntext\\n\\n" per message, then the
    assistant's turn."""
    return "".join(f"{m['role'].upper()}:\n{m['content']}\n\n" for m in messages) + "ASSISTANT:\n"


def chat_text(tokenizer, messages: list[dict[str, str]]) -> str:
    """The prompt the model's chat template makes of `messages` (the plain one without a template);
    a template that fails is the server's problem, said in OpenAI's error shape."""
    if tokenizer.chat_template is None:
        return plain_chat_prompt(messages)
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # jinja's errors and the template's own raise_exception, of any class
        message = " ".join(str(exc).split()) or type(exc).__name__
        raise ApiError(500, f"the model's chat template failed: {message}", kind="server_error") from None


TEMPLATE_LIMIT_S = 5.0


class _TooSlow(BaseException):  # not an Exception: chat_text's catch-all must let it through
    pass


@contextlib.contextmanager
def _time_limit(seconds: float):
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def too_slow(signum, frame):
        raise _TooSlow

    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def check_chat_template(tokenizer) -> None:
    """Refuses, at start-up, a chat template that cannot render a one-message conversation, or that
    takes over `TEMPLATE_LIMIT_S` to (every chat request renders it; jinja's sandbox bounds each
    loop, not loops within loops). The limit is kept in the main thread only (a signal's)."""
    try:
        with _time_limit(TEMPLATE_LIMIT_S):
            chat_text(tokenizer, [{"role": "user", "content": "hello"}])
    except ApiError as exc:
        raise UserError(exc.message) from None
    except _TooSlow:
        raise UserError(f"the model's chat template takes over {TEMPLATE_LIMIT_S:g} s to render one message: "
                        "fix its tokenizer_config.json (chat_template)") from None


def _add_error_handlers(app: FastAPI) -> None:
    """Every refusal in OpenAI's error shape: the API's own, pydantic's and routing's."""

    @app.exception_handler(ApiError)
    async def _api_error(request: HttpRequest, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: HttpRequest, exc: RequestValidationError) -> JSONResponse:
        message, field = _validation_message(exc)
        return ApiError(400, message, param=field).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: HttpRequest, exc: Exception) -> JSONResponse:  # a bug: answered, then logged
        return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: HttpRequest, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return ApiError(exc.status_code, str(exc.detail), kind=kind).response()


def _unknown_model(model: str, model_name: str) -> ApiError:
    return ApiError(404, f"the model {model!r} does not exist; this server serves {model_name!r}",
                    kind="not_found_error", code="model_not_found", param="model")


def _include_usage(body: _Sampled) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


def _usage(done: Done) -> dict:
    return {"prompt_tokens": done.n_prompt_tokens, "completion_tokens": done.n_completion_tokens,
            "total_tokens": done.n_prompt_tokens + done.n_completion_tokens}


def _check_succeeded(done: Done) -> None:
    """A request that ended in an error, as the error a plain (not streamed) request answers."""
    if done.error == SHUTTING_DOWN:
        raise ApiError(503, done.error, kind="server_error", code="shutting_down",
                       headers={"Retry-After": str(RETRY_AFTER_S)})
    if done.error is not None:
        raise ApiError(500, done.error, kind="server_error")


class _Generations:
    """A request's way through the engine: tokenized, checked against the model, submitted, and its
    deliveries read back as a whole text or as server-sent events."""

    def __init__(self, engine: Engine, model_name: str, max_tokens_cap: int, n_positions: int | None,
                 metrics: ServerMetrics, shutdown: Shutdown):
        self.engine, self.model_name, self.metrics, self.shutdown = engine, model_name, metrics, shutdown
        self.max_tokens_cap, self.n_positions = max_tokens_cap, n_positions
        self.tokenizer = engine.session.loaded.tokenizer
        # a prompt longer than this is refused untokenized
        self.prompt_chars_limit = max_prompt_chars(self.tokenizer, n_positions)

    async def tokenize(self, text: str, add_special_tokens: bool) -> list[int]:
        """The prompt's ids, tokenized off the event loop (a long prompt takes a while)."""
        if self.prompt_chars_limit is not None and len(text) > self.prompt_chars_limit:
            raise ApiError(400, f"the prompt is {len(text)} characters, more than the model's {self.n_positions} "
                           "positions can hold", code="context_length_exceeded", param="prompt")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # JSON may escape half of a UTF-16 pair ("\ud800"), which is no text
            raise ApiError(400, f"the prompt holds a lone surrogate ({text[exc.start]!r} at character {exc.start}): "
                           "not text", param="prompt") from None

        def encode() -> list[int]:
            with self.engine.tokenizer_lock:
                return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

        return await asyncio.to_thread(encode)

    def chat_prompt(self, messages: list[Message]) -> str:
        with self.engine.tokenizer_lock:
            return chat_text(self.tokenizer, [message.for_template() for message in messages])

    def _request(self, body: _Sampled, prompt_ids: list[int], deliver) -> Request:
        if body.model != self.model_name:
            raise _unknown_model(body.model, self.model_name)
        if not prompt_ids:
            raise ApiError(400, "the prompt has no tokens", param="prompt")
        asked = body.max_completion_tokens or body.max_tokens
        cap, n_positions = self.max_tokens_cap, self.n_positions
        room = cap if n_positions is None else min(cap, n_positions - len(prompt_ids))
        if room < 1 or (asked is not None and asked > room):
            limit = f"the model's {n_positions} positions" if n_positions is not None else "the server's limit"
            raise ApiError(
                400,
                f"the prompt is {len(prompt_ids)} tokens and {asked or 1} more are asked for; {limit} and the "
                f"server's cap of {cap} new tokens allow {max(room, 0)}",
                code="context_length_exceeded", param="max_tokens",
            )
        return Request(prompt_ids, asked or room, body.sampling(), body.stop_strings(), deliver)

    async def submit(self, body: _Sampled, prompt_ids: list[int]) -> tuple[Request, asyncio.Queue]:
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()

        def deliver(item: Piece | Done) -> None:  # from the engine thread
            with contextlib.suppress(RuntimeError):  # the event loop has closed: nobody is listening
                loop.call_soon_threadsafe(queue.put_nowait, item)

        request = self._request(body, prompt_ids, deliver)
        try:
            self.engine.submit(request)
        except QueueFull:
            raise ApiError(503, "the server is busy: its queue is full; retry shortly", kind="server_error",
                           code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except ShuttingDown:
            failure = self.engine.failure
            message = SHUTTING_DOWN if failure is None else f"the engine stopped: {failure}"
            raise ApiError(503, message, kind="server_error", code="shutting_down",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        return request, queue

    async def _next_item(self, request: Request, queue: asyncio.Queue, gone) -> Piece | Done:
        """The engine's next delivery for `request`; while none comes, the request is cancelled
        (and a Done with an error returned) when the client is `gone()` or the server is stopping
        and the request has run out of its time to finish."""
        while True:
            if self.shutdown.overdue():
                request.cancel()
                return Done("error", len(request.prompt_ids), 0, SHUTTING_DOWN)
            try:
                item = await asyncio.wait_for(queue.get(), _POLL_S)
            except TimeoutError:
                if await gone():
                    request.cancel()
                    return Done("cancelled", len(request.prompt_ids), 0, "the client went away")
                continue
            if not request.first_delivered:
                request.first_delivered = True
                self.metrics.ttft.observe(time.perf_counter() - request.submitted_s)
            return item

    async def collect(self, http: HttpRequest, request: Request, queue: asyncio.Queue) -> tuple[str, Done]:
        """The whole text, and how the request ended (an error raised as the answer's)."""
        pieces: list[str] = []
        while isinstance(item := await self._next_item(request, queue, http.is_disconnected), Piece):
            pieces.append(item.text)
        _check_succeeded(item)
        return "".join(pieces), item

    def stream(self, request: Request, queue: asyncio.Queue, chunk, with_usage: bool) -> EventSourceResponse:
        # sse-starlette ends streams when the server stops; `_next_item` tells them first
        return EventSourceResponse(self._events(request, queue, chunk, with_usage), ping=15,
                                   shutdown_grace_period=self.shutdown.timeout_s + ANSWER_S / 2)

    async def _events(self, request: Request, queue: asyncio.Queue, chunk, with_usage: bool) -> AsyncIterator[dict]:
        """Server-sent events: a chunk per piece, the last with the finish reason (or an error), one
        with the usage when asked, then [DONE]. sse-starlette closes the generator when the client
        goes away."""

        async def never_gone() -> bool:
            return False

        try:
            while isinstance(item := await self._next_item(request, queue, never_gone), Piece):
                yield {"data": json.dumps(chunk(item.text, None))}
            if item.error is not None:
                yield {"data": json.dumps({"error": {"message": item.error, "type": "server_error"}})}
            else:
                yield {"data": json.dumps(chunk("", item.finish_reason))}
            if with_usage:
                yield {"data": json.dumps({**chunk("", None), "choices": [], "usage": _usage(item)})}
            yield {"data": "[DONE]"}
        finally:
            request.cancel()  # a no-op once it is done; frees the slot when the client went away


def create_app(engine: Engine, model_name: str, max_tokens_cap: int, n_positions: int | None,
               metrics: ServerMetrics, shutdown: Shutdown):
    """The API over a started engine; `max_tokens_cap` bounds a request's new tokens (and is the
    default), `n_positions` the prompt plus its new tokens."""
    app = FastAPI(title="hybrimoe", docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False)
    _add_error_handlers(app)
    generations = _Generations(engine, model_name, max_tokens_cap, n_positions, metrics, shutdown)
    served = {"id": model_name, "object": "model", "created": int(time.time()), "owned_by": "hybrimoe"}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HttpRequest):
        prompt_ids = await generations.tokenize(body.prompt, add_special_tokens=True)
        request, queue = await generations.submit(body, prompt_ids)
        ident, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text: str, finish_reason: str | None) -> dict:
            return {"id": ident, "object": "text_completion", "created": now, "model": model_name,
                    "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}]}

        if body.stream:
            return generations.stream(request, queue, chunk, _include_usage(body))
        text, done = await generations.collect(http, request, queue)
        return {**chunk(text, done.finish_reason), "usage": _usage(done)}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, http: HttpRequest):
        templated = generations.tokenizer.chat_template is not None
        prompt = generations.chat_prompt(body.messages)
        prompt_ids = await generations.tokenize(prompt, add_special_tokens=not templated)
        request, queue = await generations.submit(body, prompt_ids)
        ident, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        sent_role = []

        def chunk(text: str, finish_reason: str | None) -> dict:
            delta = {"content": text} if text or finish_reason is None else {}
            if not sent_role:
                delta = {"role": "assistant", **delta}
                sent_role.append(True)
            return {"id": ident, "object": "chat.completion.chunk", "created": now, "model": model_name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}

        if body.stream:
            return generations.stream(request, queue, chunk, _include_usage(body))
        text, done = await generations.collect(http, request, queue)
        return {"id": ident, "object": "chat.completion", "created": now, "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": done.finish_reason}],
                "usage": _usage(done)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [served]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        if model != model_name:
            raise _unknown_model(model, model_name)
        return served

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        if not engine.alive:
            raise ApiError(503, "the engine is not running", kind="server_error")
        return {"status": "ok", "active": engine.n_active, "waiting": engine.n_waiting}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return _CountedRequests(app, metrics)


class _CountedRequests:
    """Counts responses by endpoint and status (an ASGI wrapper: it sees every response, streams
    and errors included, without buffering them); unknown paths count as "other". Refuses a body
    past MAX_BODY_BYTES with a 413: unread when its length is declared, as it comes when chunked;
    and a body that pauses past BODY_WAIT_S (shorter than its Content-Length, say) with a 408."""

    def __init__(self, app: FastAPI, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics
        self.paths = {route.path for route in app.routes}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"] if scope["path"] in self.paths else "other"
        declared = dict(scope.get("headers") or ()).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:  # refused unparsed
            message = f"the request body is {int(declared)} bytes; this server takes at most {MAX_BODY_BYTES}"
            with contextlib.suppress(TimeoutError):  # drained (so the client reads the answer), for a while
                async with asyncio.timeout(DRAIN_S):
                    while (await receive()).get("more_body"):
                        pass
            self.metrics.requests.labels(path, "413").inc()
            await ApiError(413, message)(scope, receive, send)
            return

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(path, str(message["status"])).inc()
            await send(message)

        received_bytes, body_done = 0, False

        async def capped_receive():  # a body that declares no length (chunked) stops at the cap as it comes
            nonlocal received_bytes, body_done
            if body_done:  # then receive waits for the client to go away, for as long as a stream lasts
                return await receive()
            try:
                async with asyncio.timeout(BODY_WAIT_S):
                    message = await receive()
            except TimeoutError:
                raise StarletteHTTPException(408, f"the request body paused over {BODY_WAIT_S:g} s") from None
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            received_bytes += len(message.get("body", b""))
            if received_bytes > MAX_BODY_BYTES:
                refusal = f"the request body is over {MAX_BODY_BYTES} bytes, this server's most"
                raise StarletteHTTPException(413, refusal)
            return message

        await self.app(scope, capped_receive, counting_send)
