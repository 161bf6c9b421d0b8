"""`hybrimoe serve` as one library call: load and plan as `run` does, then serve until stopped.

Design choices:
- The listening socket is bound before the model loads, so a taken port is one error line, not a
  minute of loading first; port 0 takes a free port (the address is reported through `on_ready`).
- Memory is planned for `max_batch` sequences filling the model's positions (or `max_tokens`
  past a prompt of the same length when the config names no limit), with `run`'s arithmetic.
- uvicorn runs the API on this thread and handles SIGINT/SIGTERM: it stops accepting, waits up to
  `shutdown_timeout_s` for the requests in flight (the engine keeps stepping for them), then
  cancels the rest; the engine then stops and the routing trace, when recording, is written.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from hybrimoe.errors import UserError
from hybrimoe.run_options import RunOptions, check_against_config

MAX_BATCH_LIMIT = 256
MAX_QUEUE_LIMIT = 100_000  # waiting requests, each holding its prompt: past it a client storm, not a queue
MAX_SHUTDOWN_TIMEOUT_S = 86_400.0  # a day; past it the event loop's timers overflow
_SERVE_MODULES = ("fastapi", "uvicorn", "sse_starlette", "prometheus_client")


DEFAULT_MAX_TOKENS = 512  # without --max-tokens


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port
    max_batch: int = 16  # sequences decoded together
    max_queue: int = 64  # requests waiting to join the full batch before 503s
    max_tokens: int | None = None  # new tokens per request at most, and for one that names none
    model_name: str | None = None  # the id clients ask for; None: the checkpoint directory's name, or "demo"
    shutdown_timeout_s: float = 30.0

    @property
    def token_cap(self) -> int:
        """New tokens per request at most: `max_tokens`, else `DEFAULT_MAX_TOKENS` (each request's
        capped by the positions its prompt leaves)."""
        return DEFAULT_MAX_TOKENS if self.max_tokens is None else self.max_tokens


@dataclass
class ServeReport:
    n_requests: int  # requests that ended, however
    n_generated_tokens: int
    trace_path: str | None


def _server(config, shutdown):
    """uvicorn's server, with SIGINT/SIGTERM ending `run` normally: uvicorn re-raises the signal
    after its graceful shutdown (so that a plain `uvicorn` exits as killed), which here would
    interrupt the engine's shutdown and the writing of the routing trace."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            shutdown.begin()
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            handled = (signal.SIGINT, signal.SIGTERM)
            original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    return Server(config)


def _json_400_protocol():
    """uvicorn's HTTP/1.1 protocol (h11, whichever parsers are installed), answering a request it
    cannot parse (a garbage request line, a negative Content-Length) with the API's JSON error
    instead of plain text."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class JsonErrors(H11Protocol):
        def send_400_response(self, msg: str) -> None:
            body = json.dumps({"error": {"message": f"malformed HTTP request: {msg}", "type": "invalid_request_error",
                                         "param": None, "code": None}}).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                       (b"connection", b"close")]
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                          h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

    return JsonErrors


def check_serve_options(options: ServeOptions) -> None:
    if not 0 <= options.port <= 65535:
        raise UserError(f"--port must be in 0-65535, got {options.port}")
    if not 1 <= options.max_batch <= MAX_BATCH_LIMIT:
        raise UserError(f"--max-batch must be in 1-{MAX_BATCH_LIMIT}, got {options.max_batch}")
    if not 0 <= options.max_queue <= MAX_QUEUE_LIMIT:
        raise UserError(f"--max-queue must be in 0-{MAX_QUEUE_LIMIT}, got {options.max_queue}")
    if options.model_name is not None and (not options.model_name.strip() or not options.model_name.isprintable()):
        raise UserError(f"--model-name must be one line of printable text, got {options.model_name!r}")
    if options.max_tokens is not None and options.max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1, got {options.max_tokens}")
    if not 0 < options.shutdown_timeout_s <= MAX_SHUTDOWN_TIMEOUT_S:
        raise UserError(f"--shutdown-timeout must be a number of seconds in (0, {MAX_SHUTDOWN_TIMEOUT_S:g}], "
                        f"got {options.shutdown_timeout_s:g}")


def check_installed() -> None:
    """Refuses, in one line, a server without the `serve` extra's libraries."""
    import importlib.util

    missing = [name for name in _SERVE_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"hybrimoe serve needs {', '.join(missing)}: pip install 'hybrimoe[serve]'")


def _listen(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UserError(f"--host {host}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    return sock


def serve(
    options: RunOptions,
    serve_options: ServeOptions,
    on_ready: Callable[[str, object], None] | None = None,
    show_progress: bool = True,
) -> ServeReport:
    """Loads the model for `options` (its prompts unused), serves it until SIGINT/SIGTERM, and
    reports what was served. `on_ready(url, session)` is called once requests are answered."""
    check_serve_options(serve_options)
    # the default --max-tokens is capped by the positions, request by request
    check_against_config(options, 0 if serve_options.max_tokens is None else serve_options.max_tokens, "--max-tokens")
    check_installed()
    import uvicorn  # torch, transformers and the web stack: seconds, so after every check that needs none

    from hybrimoe.run import open_session, prepare_tokenizer, recorded_trace
    from hybrimoe.runtime.planning import TRACE_LOOKAHEAD_DEPTH, trace_step
    from hybrimoe.runtime.threads import torch_threads
    from hybrimoe.serve.api import ANSWER_S, Shutdown, check_chat_template, create_app
    from hybrimoe.serve.engine import Engine, EngineStats
    from hybrimoe.serve.metrics import ServerMetrics

    options = RunOptions(**{**options.__dict__, "prompts": (), "max_new_tokens": serve_options.token_cap})
    sock = _listen(serve_options.host, serve_options.port)
    n_positions: list[int | None] = []

    def batch_shape(facts, tokenizer) -> tuple[int, int]:
        prepare_tokenizer(tokenizer)
        check_chat_template(tokenizer)  # before the weights load
        limit = facts.config.get("max_position_embeddings")
        n_positions.append(limit)
        prompt_tokens = max(1, limit - serve_options.token_cap) if limit else serve_options.token_cap
        return serve_options.max_batch, prompt_tokens

    try:
        session = open_session(options, batch_shape, show_progress)
        warm_ids = session.loaded.tokenizer("Warm up.", return_tensors="pt")["input_ids"].to(session.accelerator.device)
        with torch_threads(session.launching_threads()):
            session.warm_up(warm_ids, warm_ids.new_ones(warm_ids.shape))
        model_name = serve_options.model_name or (options.model.name if options.model is not None else "demo")
        metrics = ServerMetrics()
        recording = options.record_trace is not None
        steps = []

        def keep_step(records) -> None:
            steps.append(trace_step(records, TRACE_LOOKAHEAD_DEPTH))

        servers = []  # the HTTP server, once made: an engine that fails stops it

        def stop_serving() -> None:
            for server in servers:
                server.should_exit = True

        engine = Engine(
            session, serve_options.max_batch, serve_options.max_queue, EngineStats(),
            record_depth=TRACE_LOOKAHEAD_DEPTH if recording else None, on_trace_step=keep_step if recording else None,
            on_failure=stop_serving,
        )
        metrics.watch(engine)
        shutdown = Shutdown(serve_options.shutdown_timeout_s)
        app = create_app(engine, model_name, serve_options.token_cap, n_positions[0], metrics, shutdown)
        config = uvicorn.Config(app, log_level="warning", http=_json_400_protocol(),
                                timeout_graceful_shutdown=serve_options.shutdown_timeout_s + ANSWER_S)
        server = _server(config, shutdown)
        servers.append(server)
        engine.start()
        if on_ready is not None:
            host, port = sock.getsockname()[:2]
            on_ready(f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}", session)
        try:
            server.run(sockets=[sock])
        finally:
            engine.stop(serve_options.shutdown_timeout_s + ANSWER_S)
    finally:
        sock.close()
    trace_path = None
    if recording and steps:  # kept even when the engine failed: the steps before it are real
        recorded_trace(session.shape, steps, options, command="serve")
        trace_path = str(options.record_trace)
    if engine.failure is not None:
        raise RuntimeError(f"the engine stopped: {engine.failure}") from engine.failure
    stats = engine.stats
    return ServeReport(sum(stats.n_finished.values()), stats.n_completion_tokens, trace_path)
