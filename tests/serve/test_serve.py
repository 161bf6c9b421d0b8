"""`hybrimoe serve` as a user runs it: a real server process on 127.0.0.1 with the demo model, the
real `openai` client for chat, completion, streaming and parallel requests, raw HTTP for bad ones.

The outputs compared are greedy, so they do not depend on timing; nothing here measures speed.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from http.client import HTTPConnection
from pathlib import Path

import pytest

openai = pytest.importorskip("openai", reason="the test extras install the openai client")
pytest.importorskip("fastapi", reason="hybrimoe serve needs its extra: pip install 'hybrimoe[serve]'")

HYBRIMOE = [sys.executable, "-c", "from hybrimoe.cli import main; main()"]
START_TIMEOUT_S = 240  # imports, loading and the warm-up on a loaded 2-core machine
PROMPTS = ("ROMEO:", "JULIET:\nO", "KING RICHARD III:\nNow is", "First Citizen:\nWe are", "HAMLET:", "MENENIUS:\nWhat")


class Server:
    """A `hybrimoe serve --port 0` process; `url` once it listens."""

    def __init__(self, tmp: Path, *args: str):
        self.stderr_path = tmp / "server.err"
        self.stdout_path = tmp / "server.out"
        self.process = subprocess.Popen(
            [*HYBRIMOE, "serve", "--port", "0", "--device", "cpu", *args],
            stdout=self.stdout_path.open("w"), stderr=self.stderr_path.open("w"),
        )
        self.url = self._wait_for_url()

    def _wait_for_url(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            match = re.search(r"listening on (http://\S+)", self.stderr_path.read_text())
            if match:
                return match.group(1)
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited: {self.stderr_path.read_text()[-3000:]}")
            time.sleep(0.2)
        self.process.kill()
        raise AssertionError("the server did not start")

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=120)

    def stop(self, sig: int = signal.SIGINT) -> int:
        self.process.send_signal(sig)
        return self.process.wait(timeout=120)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    served = Server(tmp, "--max-batch", "8", "--record-trace", str(tmp / "served.npz"))
    yield served
    if served.process.poll() is None:
        served.stop()


def http(server: Server, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(f"{server.url}{path}", data=body, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def complete(client, prompt: str, n: int = 40, **kw) -> str:
    return client.completions.create(model="demo", prompt=prompt, max_tokens=n, temperature=0, **kw).choices[0].text


def test_greedy_completion_equals_hybrimoe_run(server):
    from hybrimoe.run import RunOptions, run

    served = complete(server.client(), "ROMEO:", 40)
    ran = run(RunOptions(prompts=("ROMEO:",), max_new_tokens=40, device="cpu"), show_progress=False).texts[0]
    assert served == ran and served


def test_a_prompt_list_of_one_is_the_prompt(server):
    client = server.client()
    listed = client.completions.create(model="demo", prompt=["ROMEO:"], max_tokens=12, temperature=0).choices[0].text
    assert listed == complete(client, "ROMEO:", 12)


def test_completion_reports_usage_and_length(server):
    out = server.client().completions.create(model="demo", prompt="ROMEO:", max_tokens=12, temperature=0)
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == len("ROMEO:") and out.usage.completion_tokens == 12
    assert out.model == "demo"


def test_chat_completion(server):
    out = server.client().chat.completions.create(
        model="demo", messages=[{"role": "system", "content": "Speak as a king."},
                                {"role": "user", "content": "Who art thou?"}], max_tokens=24, temperature=0,
    )
    choice = out.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length") and out.usage.completion_tokens <= 24


def test_streams_equal_the_whole_answers(server):
    client = server.client()
    whole = complete(client, "HAMLET:", 30)
    pieces = [c.choices[0].text for c in client.completions.create(
        model="demo", prompt="HAMLET:", max_tokens=30, temperature=0, stream=True)]
    assert "".join(pieces) == whole and len(pieces) > 5

    messages = [{"role": "user", "content": "Speak."}]
    chat = client.chat.completions.create(model="demo", messages=messages, max_tokens=30, temperature=0)
    chunks = list(client.chat.completions.create(model="demo", messages=messages, max_tokens=30, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == chat.choices[0].finish_reason


def test_a_stream_reports_its_usage_when_asked(server):
    chunks = list(server.client().completions.create(model="demo", prompt="ROMEO:", max_tokens=10, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == len("ROMEO:")


def test_parallel_requests_are_batched_and_each_gets_its_own_answer(server):
    client = server.client()
    alone = [complete(client, p, 48) for p in PROMPTS]
    steps_before = _metric(server, "hybrimoe_steps_total")
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(lambda p: complete(client, p, 48), PROMPTS))
    assert together == alone
    # batched: fewer forward steps than tokens (one prefill and 47 decode steps each, alone)
    assert _metric(server, "hybrimoe_steps_total") - steps_before < len(PROMPTS) * 48


def test_sampling_is_seeded_and_stops_at_stop_strings(server):
    client = server.client()
    sampled = [client.completions.create(model="demo", prompt="ROMEO:", max_tokens=30, temperature=0.9, top_p=0.9,
                                         seed=7).choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1]
    whole = complete(client, "ROMEO:", 60)
    stop = whole.strip().split()[1]  # a word the greedy text reaches
    out = client.completions.create(model="demo", prompt="ROMEO:", max_tokens=60, temperature=0, stop=[stop])
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].text == whole[: whole.index(stop)]


def test_openai_message_forms_and_bookkeeping_fields_are_taken(server):
    client = server.client()
    plain = client.chat.completions.create(
        model="demo", messages=[{"role": "system", "content": "Speak as a king."}, {"role": "user", "content": "Hail."}],
        max_tokens=12, temperature=0,
    ).choices[0].message.content
    parts = client.chat.completions.create(
        model="demo", messages=[{"role": "developer", "content": "Speak as a king."},
                                {"role": "user", "content": [{"type": "text", "text": "Ha"}, {"type": "text", "text": "il."}],
                                 "name": "messenger"}],
        max_tokens=12, temperature=0, user="someone", metadata={"run": "1"},
    ).choices[0].message.content
    assert parts == plain


def test_models_health_and_metrics(server):
    assert [m.id for m in server.client().models.list()] == ["demo"]
    assert server.client().models.retrieve("demo").id == "demo"
    assert http(server, "GET", "/v1/models/gpt-9")[0] == 404
    status, _, body = http(server, "GET", "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    assert http(server, "HEAD", "/health")[0] == 200
    status, headers, body = http(server, "GET", "/metrics")
    text = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/plain")
    for name in ("hybrimoe_requests_total", "hybrimoe_time_to_first_token_seconds_bucket", "hybrimoe_queue_depth",
                 "hybrimoe_tokens_per_second", "hybrimoe_expert_cache_hit_rate", "hybrimoe_expert_bytes_copied_total",
                 "hybrimoe_planner_seconds_total", "hybrimoe_generated_tokens_total"):
        assert name in text, name


def _metric(server: Server, name: str) -> float:
    text = http(server, "GET", "/metrics")[2].decode()
    return float(re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE).group(1))


BAD_REQUESTS = [
    ("malformed JSON", "/v1/completions", b'{"model": "demo", "prompt": ', 400, None),
    ("not an object", "/v1/completions", b'[1, 2]', 400, None),
    ("unknown model", "/v1/completions", {"model": "gpt-9", "prompt": "x"}, 404, "model_not_found"),
    ("negative max_tokens", "/v1/completions", {"model": "demo", "prompt": "x", "max_tokens": -1}, 400, None),
    ("huge max_tokens", "/v1/completions", {"model": "demo", "prompt": "x", "max_tokens": 10**9}, 400,
     "context_length_exceeded"),
    ("prompt longer than the context", "/v1/completions", {"model": "demo", "prompt": "x" * 300}, 400,
     "context_length_exceeded"),
    ("prompt of the wrong type", "/v1/completions", {"model": "demo", "prompt": 5}, 400, None),
    ("empty prompt", "/v1/completions", {"model": "demo", "prompt": ""}, 400, None),
    ("temperature a string", "/v1/completions", {"model": "demo", "prompt": "x", "temperature": "hot"}, 400, None),
    ("temperature out of range", "/v1/completions", {"model": "demo", "prompt": "x", "temperature": 9}, 400, None),
    ("top_p zero", "/v1/completions", {"model": "demo", "prompt": "x", "top_p": 0}, 400, None),
    ("stream a string", "/v1/completions", {"model": "demo", "prompt": "x", "stream": "yes"}, 400, None),
    ("negative seed", "/v1/completions", {"model": "demo", "prompt": "x", "seed": -1}, 400, None),
    ("five stop strings", "/v1/completions", {"model": "demo", "prompt": "x", "stop": list("abcde")}, 400, None),
    ("empty stop string", "/v1/completions", {"model": "demo", "prompt": "x", "stop": ""}, 400, None),
    ("n of 2", "/v1/completions", {"model": "demo", "prompt": "x", "n": 2}, 400, None),
    ("no model", "/v1/completions", {"prompt": "x"}, 400, None),
    ("no messages", "/v1/chat/completions", {"model": "demo"}, 400, None),
    ("empty messages", "/v1/chat/completions", {"model": "demo", "messages": []}, 400, None),
    ("unknown role", "/v1/chat/completions", {"model": "demo", "messages": [{"role": "wizard", "content": "x"}]},
     400, None),
    ("content a list of numbers", "/v1/chat/completions",
     {"model": "demo", "messages": [{"role": "user", "content": [1, 2]}]}, 400, None),
    ("unknown path", "/v1/engines", {"model": "demo"}, 404, None),
    ("a trailing slash", "/v1/completions/", {"model": "demo", "prompt": "x"}, 404, None),
    ("stream options without a stream", "/v1/completions",
     {"model": "demo", "prompt": "x", "stream_options": {"include_usage": True}}, 400, None),
    ("a body past the limit", "/v1/completions", b'{"model": "demo", "prompt": "' + b"x" * (17 * 2**20) + b'"}',
     413, None),
    ("logprobs asked", "/v1/completions", {"model": "demo", "prompt": "x", "logprobs": 5}, 400, None),
    ("echo asked", "/v1/completions", {"model": "demo", "prompt": "x", "echo": True}, 400, None),
    ("a penalty", "/v1/completions", {"model": "demo", "prompt": "x", "frequency_penalty": 0.5}, 400, None),
    ("tools", "/v1/chat/completions",
     {"model": "demo", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, 400, None),
    ("a misspelt field", "/v1/completions", {"model": "demo", "prompt": "x", "max_token": 2}, 400, None),
    ("an unknown field", "/v1/completions", {"model": "demo", "prompt": "x", "temprature": 0.5}, 400, None),
    ("both length limits", "/v1/completions",
     {"model": "demo", "prompt": "x", "max_tokens": 4, "max_completion_tokens": 8}, 400, None),
    ("two prompts", "/v1/completions", {"model": "demo", "prompt": ["x", "y"]}, 400, None),
    ("an image part", "/v1/chat/completions",
     {"model": "demo", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, None),
]


@pytest.mark.parametrize("case, path, body, status, code", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_gets_an_openai_error(server, case, path, body, status, code):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    got, headers, raw = http(server, "POST", path, data)
    assert got == status, raw
    error = json.loads(raw)["error"]
    assert error["message"] and error["type"]
    if code is not None:
        assert error["code"] == code
    assert http(server, "GET", "/health")[0] == 200  # the server lives on


@pytest.mark.parametrize("content_type", ["text/plain", ""])
def test_a_json_body_sent_as_another_type_is_told_the_type(server, content_type):
    body = json.dumps({"model": "demo", "prompt": "x"}).encode()
    got, _, raw = http(server, "POST", "/v1/completions", body, headers={"Content-Type": content_type})
    assert got == 400 and "Content-Type: application/json" in json.loads(raw)["error"]["message"]


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", b'{"model": "demo", "prompt": "\\ud800", "max_tokens": 2}'),
    ("/v1/completions", b'{"model": "demo", "prompt": "\\ud800", "max_tokens": 2, "stream": true}'),
    ("/v1/chat/completions", b'{"model": "demo", "messages": [{"role": "user", "content": "hi \\udc80"}]}'),
])
def test_a_lone_surrogate_is_a_bad_request(server, path, body):
    got, _, raw = http(server, "POST", path, body)
    assert got == 400 and "lone surrogate" in json.loads(raw)["error"]["message"]


def test_a_chunked_body_past_the_limit_is_refused_as_it_comes(server):
    """Without a Content-Length the body is counted as it arrives: 413, never read whole."""
    host, port = server.url.removeprefix("http://").split(":")
    connection = HTTPConnection(host, int(port), timeout=120)
    chunks = (b'{"model": "demo", "prompt": "' if i == 0 else b"x" * 2**20 for i in range(20))  # 19 MiB
    connection.request("POST", "/v1/completions", body=chunks, encode_chunked=True,
                       headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
    response = connection.getresponse()
    assert response.status == 413 and "over" in json.loads(response.read())["error"]["message"]
    connection.close()
    assert http(server, "GET", "/health")[0] == 200


@pytest.mark.parametrize("request_bytes", [
    b"GARBAGE\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
])
def test_a_request_http_cannot_parse_gets_the_json_error(server, request_bytes):
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        connection.sendall(request_bytes)
        raw = b""
        while chunk := connection.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 Bad Request") and b"content-type: application/json" in head.lower(), raw
    assert json.loads(body)["error"]["message"].startswith("malformed HTTP request")
    assert http(server, "GET", "/health")[0] == 200


def test_an_empty_stop_string_is_named(server):
    body = json.dumps({"model": "demo", "prompt": "x", "stop": ""}).encode()
    got, _, raw = http(server, "POST", "/v1/completions", body)
    assert got == 400 and "must not be empty" in json.loads(raw)["error"]["message"]


def test_a_client_that_goes_away_frees_its_place(server):
    cancelled = _metric(server, 'hybrimoe_finished_requests_total{reason="cancelled"}')
    stream = server.client().completions.create(model="demo", prompt="ROMEO:", max_tokens=200, temperature=0,
                                                stream=True)
    next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 60
    while _metric(server, 'hybrimoe_finished_requests_total{reason="cancelled"}') == cancelled:
        assert time.monotonic() < deadline, "the abandoned request was not cancelled"
        time.sleep(0.1)
    assert _metric(server, "hybrimoe_active_sequences") == 0


def test_a_full_queue_answers_503_with_retry_after(tmp_path):
    served = Server(tmp_path, "--max-batch", "1", "--max-queue", "1")
    try:
        body = json.dumps({"model": "demo", "prompt": "ROMEO:", "max_tokens": 200, "temperature": 0}).encode()
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda _: http(served, "POST", "/v1/completions", body), range(6)))
        statuses = sorted(status for status, _, _ in answers)
        assert set(statuses) == {200, 503} and statuses.count(200) >= 2, statuses
        for status, headers, raw in answers:
            if status == 503:
                assert headers["retry-after"] == "1" and json.loads(raw)["error"]["code"] == "queue_full"
    finally:
        served.stop()


def test_sigterm_finishes_or_tells_in_flight_requests_and_writes_the_trace(tmp_path):
    trace = tmp_path / "served.npz"
    served = Server(tmp_path, "--shutdown-timeout", "0.5", "--record-trace", str(trace))
    body = json.dumps({"model": "demo", "prompt": "ROMEO:", "max_tokens": 240, "temperature": 0}).encode()
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        answers = [pool.submit(http, served, "POST", "/v1/completions", body) for _ in range(3)]
        _wait_until_admitted(served, 3)  # signalled only once the three are in, however loaded the machine
        assert served.stop(signal.SIGTERM) == 0
        results = [a.result() for a in answers]
    for status, _, raw in results:
        assert status == 200 or (status == 503 and json.loads(raw)["error"]["code"] == "shutting_down"), raw
    assert "Traceback" not in served.stderr_path.read_text()
    assert "served 3 requests" in served.stdout_path.read_text()
    from hybrimoe.trace import load_trace

    assert load_trace(trace).n_tokens > 0


def _wait_until_admitted(server: Server, n_requests: int) -> None:
    """Until the server holds (waiting, running or finished) `n_requests` requests."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        text = http(server, "GET", "/metrics")[2].decode()
        held = sum(float(value) for name, value in re.findall(
            r"^(hybrimoe_queue_depth|hybrimoe_active_sequences|hybrimoe_finished_requests_total\{[^}]*\}) (\S+)$",
            text, re.MULTILINE))
        if held >= n_requests:
            return
        assert time.monotonic() < deadline, f"only {held} of {n_requests} requests reached the server"
        time.sleep(0.05)


def test_a_taken_port_is_one_line(tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        done = subprocess.run([*HYBRIMOE, "serve", "--port", str(port)], capture_output=True, text=True,
                              timeout=120)
    finally:
        taken.close()
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and f"cannot listen on 127.0.0.1:{port}" in lines[0], done.stderr


def test_a_chat_template_that_renders_for_ever_is_refused_at_start_up(monkeypatch):
    """jinja's sandbox bounds each loop, not loops within loops: the start-up render has a time limit."""
    from types import SimpleNamespace

    from hybrimoe.errors import UserError
    from hybrimoe.serve import api

    def render_for_ever(*args, **kwargs):
        while True:
            pass

    monkeypatch.setattr(api, "TEMPLATE_LIMIT_S", 0.2)
    tokenizer = SimpleNamespace(chat_template="{% for i in range(99999) %}...", apply_chat_template=render_for_ever)
    with pytest.raises(UserError, match="takes over 0.2 s to render one message"):
        api.check_chat_template(tokenizer)


def test_a_body_that_never_comes_is_refused_with_408(monkeypatch):
    """A request shorter than its Content-Length used to hold its connection for good; a stream's
    wait for the client to go away, once the body is in, has no such limit."""
    import asyncio

    from fastapi import FastAPI
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from hybrimoe.serve import api
    from hybrimoe.serve.metrics import ServerMetrics

    async def echo(request):
        return JSONResponse(await request.json())

    monkeypatch.setattr(api, "BODY_WAIT_S", 0.2)
    inner = FastAPI()
    api._add_error_handlers(inner)
    inner.router.routes.append(Route("/v1/completions", echo, methods=["POST"]))
    app = api._CountedRequests(inner, ServerMetrics())
    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "headers": [(b"content-length", b"100")], "http_version": "1.1",
             "scheme": "http", "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 1), "root_path": ""}
    sent = []
    first = [{"type": "http.request", "body": b'{"model": ', "more_body": True}]

    async def receive():
        if first:
            return first.pop()
        await asyncio.sleep(3600)  # the rest of the body never comes

    async def send(message):
        sent.append(message)

    asyncio.run(asyncio.wait_for(app(scope, receive, send), timeout=30))
    assert sent[0]["status"] == 408
    assert "paused over 0.2 s" in json.loads(sent[1]["body"])["error"]["message"]
