"""`hybrimoe serve` under concurrent clients, and llama.cpp's `llama-server` under the same load.

For each number of clients (default 1, 4, 16), that many threads send streaming completions
(`/v1/completions`, a prompt from a fixed list, `--max-tokens` new tokens, greedy, usage in the
last chunk) back to back for `--seconds`, on loopback only, and the script prints: requests
finished, failed (anything but a 200 and a complete stream) and refused (503 with Retry-After,
counted apart: a full queue is not an error), generated tokens per second, time to first token
(p50/p90/p99) and the gaps between a stream's tokens (p50/p99). Each server runs on its own, with
the same threads; the ratios are hybrimoe's over llama-server's, measured in the same run.

llama-server (`--llama-cpp DIR` or $LLAMA_CPP_DIR, built by ../shared/peers/llama.cpp/build.sh)
serves the demo model converted to an F32 GGUF as `bench_cpu_peer.py` converts it, with one slot
per client at the demo's 256 positions. Without it only hybrimoe is measured.

Usage: python benchmarks/bench_serve.py [--clients 1,4,16] [--seconds 60] [--max-tokens 64]
       [--threads N] [--llama-cpp DIR] [--markdown]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPTS = ("ROMEO:", "JULIET:\nO", "KING RICHARD III:\nNow is", "First Citizen:\nWe are", "HAMLET:",
           "MENENIUS:\nWhat", "DUKE VINCENTIO:\n", "LADY ANNE:\nSet down")
START_TIMEOUT_S = 300
DEMO_POSITIONS = 256


@dataclass
class Load:
    """What the clients of one run saw."""

    finished: int = 0
    failed: int = 0
    refused: int = 0
    tokens: int = 0
    ttft_s: list[float] = field(default_factory=list)
    gaps_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def stream_once(url: str, prompt: str, max_tokens: int, load: Load) -> bool:
    """One streaming completion; its outcome and timings go into `load`. False when it was refused
    (503 with Retry-After)."""
    body = json.dumps({"model": "demo", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True}}).encode()
    request = urllib.request.Request(f"{url}/v1/completions", data=body, headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    arrivals: list[float] = []
    usage = None
    done = False
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            for raw in response:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    raise RuntimeError(event["error"].get("message"))
                if event.get("usage"):
                    usage = event["usage"]
                if any(choice.get("text") for choice in event.get("choices", ())):
                    arrivals.append(time.perf_counter())
    except urllib.error.HTTPError as exc:
        with load.lock:
            if exc.code == 503 and exc.headers.get("Retry-After"):
                load.refused += 1
                return False
            load.failed += 1
            load.errors.append(f"HTTP {exc.code}")
        return True
    except (OSError, RuntimeError, ValueError) as exc:
        with load.lock:
            load.failed += 1
            load.errors.append(f"{type(exc).__name__}: {exc}")
        return True
    with load.lock:
        if not done or usage is None or not arrivals:
            load.failed += 1
            load.errors.append("the stream ended early")
            return True
        load.finished += 1
        load.tokens += usage["completion_tokens"]
        load.ttft_s.append(arrivals[0] - start)
        load.gaps_s.extend(b - a for a, b in zip(arrivals, arrivals[1:]))
    return True


def drive(url: str, n_clients: int, seconds: float, max_tokens: int) -> tuple[Load, float]:
    """`n_clients` threads sending requests back to back for `seconds`; (what they saw, wall time)."""
    load = Load()
    stop_at = time.perf_counter() + seconds

    def client(index: int) -> None:
        turn = index
        while time.perf_counter() < stop_at:
            if not stream_once(url, PROMPTS[turn % len(PROMPTS)], max_tokens, load):
                time.sleep(1.0)  # as Retry-After asks
            turn += n_clients

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(n_clients) as pool:
        list(pool.map(client, range(n_clients)))
    return load, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


class Process:
    """A server process; `url` once it answers /health."""

    def __init__(self, argv: list[str], url: str | None, log: Path, env: dict[str, str] | None = None):
        self.log = log
        self.process = subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
        self.url = url or self._url_from_log()
        self._wait_healthy()

    def _url_from_log(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            match = re.search(r"listening on (http://\S+)", self.log.read_text())
            if match:
                return match.group(1)
            self._check_alive()
            time.sleep(0.2)
        raise SystemExit(f"the server did not start: {self.log}")

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            self._check_alive()
            time.sleep(0.5)
        raise SystemExit(f"the server did not become healthy: {self.log}")

    def _check_alive(self) -> None:
        if self.process.poll() is not None:
            raise SystemExit(f"the server exited: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=120)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_hybrimoe(threads: int, max_batch: int, workdir: Path) -> Process:
    argv = [sys.executable, "-c", "from hybrimoe.cli import main; main()", "serve", "--port", "0", "--device", "cpu",
            "--threads", str(threads), "--max-batch", str(max_batch)]
    return Process(argv, None, workdir / "hybrimoe-serve.log")


def start_llama_server(llama: Path, gguf: Path, threads: int, slots: int, workdir: Path) -> Process:
    port = free_port()
    argv = [str(llama / "build" / "bin" / "llama-server"), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
            "-t", str(threads), "-tb", str(threads), "-np", str(slots), "-c", str(DEMO_POSITIONS * slots),
            "--no-webui"]
    return Process(argv, f"http://127.0.0.1:{port}", workdir / "llama-server.log")


def demo_gguf(llama: Path, workdir: Path) -> Path:
    from bench_cpu_peer import ROWS, gguf_for, untied_demo

    return gguf_for(ROWS["demo"], untied_demo(workdir), llama, workdir)


def llama_folder(option: str | None) -> Path | None:
    folder = option or os.environ.get("LLAMA_CPP_DIR")
    if folder and (Path(folder) / "build" / "bin" / "llama-server").is_file():
        return Path(folder)
    return None


def row(engine: str, n_clients: int, load: Load, wall_s: float) -> dict:
    ms = lambda v: None if v is None else 1000 * v  # noqa: E731
    return {
        "engine": engine, "clients": n_clients, "finished": load.finished, "failed": load.failed,
        "refused": load.refused, "tokens_per_s": load.tokens / wall_s,
        "ttft_p50_ms": ms(percentile(load.ttft_s, 50)), "ttft_p90_ms": ms(percentile(load.ttft_s, 90)),
        "ttft_p99_ms": ms(percentile(load.ttft_s, 99)), "gap_p50_ms": ms(percentile(load.gaps_s, 50)),
        "gap_p99_ms": ms(percentile(load.gaps_s, 99)), "errors": sorted(set(load.errors))[:3],
    }


def print_rows(rows: list[dict], markdown: bool) -> None:
    columns = ["engine", "clients", "finished", "failed", "refused", "tokens_per_s", "ttft_p50_ms", "ttft_p90_ms",
               "ttft_p99_ms", "gap_p50_ms", "gap_p99_ms"]
    fmt = lambda v: "n/a" if v is None else (f"{v:.1f}" if isinstance(v, float) else str(v))  # noqa: E731
    if markdown:
        print("| " + " | ".join(columns) + " |")
        print("|" + "---|" * len(columns))
        for r in rows:
            print("| " + " | ".join(fmt(r[c]) for c in columns) + " |")
    else:
        print("  ".join(f"{c:>12}" for c in columns))
        for r in rows:
            print("  ".join(f"{fmt(r[c]):>12}" for c in columns))
    for r in rows:
        if r["errors"]:
            print(f"{r['engine']}, {r['clients']} clients: {r['errors']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--llama-cpp", help="the folder build.sh built llama.cpp in (else $LLAMA_CPP_DIR)")
    parser.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "hybrimoe-bench")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    if not 0 < args.seconds <= 3600 or args.max_tokens < 1 or min(clients) < 1:
        raise SystemExit("--seconds must be in (0, 3600], --max-tokens and each client count at least 1")
    args.workdir.mkdir(parents=True, exist_ok=True)
    llama = llama_folder(args.llama_cpp)
    if llama is None:
        print("llama-server not found (build it with ../shared/peers/llama.cpp/build.sh DIR, then --llama-cpp DIR): "
              "measuring hybrimoe only", file=sys.stderr)
    logs = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    engines = {"hybrimoe": lambda: start_hybrimoe(args.threads, max(clients), logs)}
    if llama is not None:
        gguf = demo_gguf(llama, args.workdir)
        engines["llama-server"] = lambda: start_llama_server(llama, gguf, args.threads, max(clients), logs)
    rows = []
    for engine, start in engines.items():
        server = start()
        try:
            drive(server.url, 1, min(5.0, args.seconds), args.max_tokens)  # warm-up
            for n_clients in clients:
                load, wall_s = drive(server.url, n_clients, args.seconds, args.max_tokens)
                rows.append(row(engine, n_clients, load, wall_s))
                print(f"{engine}, {n_clients} clients: {rows[-1]['tokens_per_s']:.1f} tokens/s", file=sys.stderr)
        finally:
            server.stop()
    print(f"\n{args.seconds:g} s per cell, {args.max_tokens} new tokens per request, {args.threads} threads, "
          "demo model, loopback; server logs in " + str(logs))
    print_rows(rows, args.markdown)
    by_key = {(r["engine"], r["clients"]): r for r in rows}
    for n_clients in clients:
        ours, peer = by_key.get(("hybrimoe", n_clients)), by_key.get(("llama-server", n_clients))
        if ours and peer and peer["tokens_per_s"]:
            ratio = ours["tokens_per_s"] / peer["tokens_per_s"]
            print(f"{n_clients} clients: hybrimoe/llama-server throughput {ratio:.2f}x")
    if ("hybrimoe", 1) in by_key:
        base = by_key[("hybrimoe", 1)]["tokens_per_s"]
        for n_clients in clients[1:]:
            print(f"hybrimoe {n_clients} clients vs 1: {by_key[('hybrimoe', n_clients)]['tokens_per_s'] / base:.2f}x "
                  "throughput (batching)")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
