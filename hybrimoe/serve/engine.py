"""The serving engine: one thread runs the model's steps, every active request's token in one batch.

Shapes: B = active sequences, S = cached positions (left-padded), V = vocabulary.

Design choices:
- One engine thread owns the model, the hybrid runtime and the batch's KV cache. HTTP handlers
  only submit requests and read what is delivered to them (`Request.deliver`, called from the
  engine thread), so a step never waits on a client and the engine knows nothing of HTTP.
- Continuous batching: between two decode steps, waiting requests join (each is prefilled alone,
  exactly as `hybrimoe run` prefills one prompt, then its KV cache is left-padded to the batch's
  length and appended) and finished or cancelled ones leave (their rows are dropped from the
  cache, then the columns that are padding in every remaining row). Positions are per row, so a
  row's tokens see exactly what they would alone; only the batch's shapes change.
- Only caches whose every layer is a plain `DynamicLayer` (full attention) are merged; a model
  with other cache layers (sliding windows, linear attention) takes new requests only when the
  batch is empty.
- Each request samples with its own temperature, top_p and seed (`generate.sampler`) and stops at
  an EOS token, its `max_tokens` or one of its stop strings (`text.TextOutput`).
- The waiting queue is bounded: beyond the batch's free places, `max_queue` requests wait, and
  `submit` raises `QueueFull` for more instead of growing (the server answers 503). A request whose client went away (`cancel`) leaves at the next step boundary.
- `stop()` refuses new requests, tells the waiting ones, lets the active ones finish, then ends
  the thread; the routing of every step is kept when recording, for `hybrimoe tune`.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from hybrimoe.run_options import Sampling
from hybrimoe.runtime.generate import sampler
from hybrimoe.serve.text import TextOutput

log = logging.getLogger("hybrimoe.serve")


SHUTTING_DOWN = "the server is shutting down"


class QueueFull(Exception):
    """The waiting queue holds as many requests as it may."""


class ShuttingDown(Exception):
    """The engine takes no new requests."""


@dataclass(frozen=True)
class Piece:
    """New text of a request."""

    text: str


@dataclass(frozen=True)
class Done:
    """A request's end: why it stopped, its token counts, and an error message when it failed."""

    finish_reason: str  # "stop" (EOS or a stop string), "length" (max_tokens), "cancelled", "error"
    n_prompt_tokens: int
    n_completion_tokens: int
    error: str | None = None


@dataclass
class Request:
    prompt_ids: list[int]
    max_tokens: int
    sampling: Sampling
    stop: tuple[str, ...]
    deliver: Callable[[Piece | Done], None]  # called from the engine thread
    submitted_s: float = field(default_factory=time.perf_counter)
    first_delivered: bool = False  # set by the reader, for the time to first token
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


class EngineStats:
    """What the engine has done, for /metrics (written by the engine thread, read by any)."""

    def __init__(self):
        self.n_prompt_tokens = 0
        self.n_completion_tokens = 0
        self.n_finished: collections.Counter[str] = collections.Counter()  # by finish reason
        self.n_steps = 0
        self.recent_tokens: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens) per step
        self._lock = threading.Lock()

    def prefilled(self, n_prompt_tokens: int) -> None:
        with self._lock:
            self.n_prompt_tokens += n_prompt_tokens

    def step(self, n_tokens: int, window_s: float = 10.0) -> None:
        now = time.perf_counter()
        with self._lock:
            self.n_steps += 1
            self.n_completion_tokens += n_tokens
            self.recent_tokens.append((now, n_tokens))
            while self.recent_tokens and self.recent_tokens[0][0] < now - window_s:
                self.recent_tokens.popleft()

    def tokens_per_s(self, window_s: float = 10.0) -> float:
        """Generated tokens per second over the last `window_s` seconds."""
        now = time.perf_counter()
        with self._lock:
            return sum(n for t, n in self.recent_tokens if t >= now - window_s) / window_s


class _Sequence:
    """An active request: its sampler, its text so far and where its next token goes."""

    def __init__(self, request: Request, tokenizer, eos_ids: frozenset[int], device: torch.device):
        self.request = request
        self.sample = sampler(request.sampling, device)
        self.output = TextOutput(tokenizer, request.stop)
        self.eos_ids = eos_ids
        self.n_generated = 0
        self.last_token = 0
        self.next_position = len(request.prompt_ids)
        self.finish_reason: str | None = None

    def push(self, logits: torch.Tensor) -> None:  # [1, V]
        token = int(self.sample(logits)[0])
        self.n_generated += 1
        self.last_token = token
        if token in self.eos_ids:
            self._finish("stop")
            return
        piece, stopped = self.output.push(token)
        if piece:
            self.request.deliver(Piece(piece))
        if stopped:
            self._finish("stop")
        elif self.n_generated >= self.request.max_tokens:
            self._finish("length")

    def cancel_if_asked(self) -> None:
        if self.finish_reason is None and self.request.cancelled.is_set():
            self._finish("cancelled")

    def fail(self, message: str) -> None:
        self.finish_reason = "error"
        self.request.deliver(Done("error", len(self.request.prompt_ids), self.n_generated, message))

    def _finish(self, reason: str) -> None:
        self.finish_reason = reason
        rest = self.output.flush() if reason != "cancelled" else ""
        if rest:
            self.request.deliver(Piece(rest))
        self.request.deliver(Done(reason, len(self.request.prompt_ids), self.n_generated))


class _Batch:
    """The active sequences with their KV cache [B, ., S, .] per layer and attention mask [B, S]."""

    def __init__(self):
        self.rows: list[_Sequence] = []
        self.cache = None
        self.mask: torch.Tensor | None = None  # [B, S], 0 on left padding

    def add(self, row: _Sequence, cache, mask: torch.Tensor) -> None:
        """Appends one prefilled sequence (its cache [1, ., S1, .], mask [1, S1]), left-padding
        whichever side is shorter."""
        if not self.rows:
            self.rows, self.cache, self.mask = [row], cache, mask
            return
        n_old, n_new = self.mask.shape[1], mask.shape[1]
        width = max(n_old, n_new)
        for old_layer, new_layer in zip(self.cache.layers, cache.layers):
            old_layer.keys = torch.cat([_left_pad(old_layer.keys, width), _left_pad(new_layer.keys, width)])
            old_layer.values = torch.cat([_left_pad(old_layer.values, width), _left_pad(new_layer.values, width)])
        self.mask = torch.cat([_left_pad_mask(self.mask, width), _left_pad_mask(mask, width)])
        self.rows.append(row)

    def drop_finished(self) -> None:
        """Removes the finished rows, then the columns that are padding in every remaining row."""
        keep = [i for i, row in enumerate(self.rows) if row.finish_reason is None]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self.cache, self.mask = [], None, None
            return
        index = torch.tensor(keep, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]
        self.rows = [self.rows[i] for i in keep]
        first = int(self.mask.any(dim=0).nonzero()[0])  # the first column some row uses
        if first:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]
            self.mask = self.mask[:, first:]


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:  # [B, H, S, Dh] -> [B, H, width, Dh]
    return torch.nn.functional.pad(t, (0, 0, width - t.shape[-2], 0))


def _left_pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:  # [B, S] -> [B, width]
    return torch.nn.functional.pad(mask, (width - mask.shape[1], 0))


class Engine:
    """Runs `session`'s model for every submitted request (`serve/__init__.py` builds it)."""

    def __init__(self, session, max_batch: int, max_queue: int, stats: EngineStats, record_depth: int | None = None,
                 on_trace_step: Callable[[list], None] | None = None, on_failure: Callable[[], None] = lambda: None):
        """`record_depth`: keep each step's routing with this many later layers' predictions, and
        hand it to `on_trace_step` (the runtime's per-layer records) after every step. `on_failure`
        is called from the engine thread if it stops on an error (the server then stops too)."""
        from hybrimoe.run import eos_ids

        self.session, self.max_batch, self.max_queue, self.stats = session, max_batch, max_queue, stats
        self.record_depth, self.on_trace_step, self.on_failure = record_depth, on_trace_step, on_failure
        self.model = session.loaded.model
        self.tokenizer_lock = threading.Lock()  # the tokenizer is shared with the HTTP handlers
        self._eos_ids = frozenset(eos_ids(session.loaded))
        self._waiting: collections.deque[Request] = collections.deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._batch = _Batch()
        self._mergeable = True  # set once the first cache is seen
        self.runtime = None  # set by the engine thread; read by /metrics
        self._thread = threading.Thread(target=self._run, name="hybrimoe-engine", daemon=True)
        self.failure: BaseException | None = None

    # --- called from any thread --------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, request: Request) -> None:
        with self._wake:
            if self._stopping or self.failure is not None:
                raise ShuttingDown
            free_slots = max(0, self.max_batch - len(self._batch.rows))
            if len(self._waiting) >= self.max_queue + free_slots:
                raise QueueFull
            self._waiting.append(request)
            self._wake.notify()

    def stop(self, timeout_s: float | None = None) -> None:
        """No new requests; the waiting ones are told; the active ones finish (within `timeout_s`)."""
        with self._wake:
            self._stopping = True
            waiting, self._waiting = list(self._waiting), collections.deque()
            self._wake.notify()
        for request in waiting:
            request.deliver(Done("error", len(request.prompt_ids), 0, SHUTTING_DOWN))
        self._thread.join(timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def n_waiting(self) -> int:
        return len(self._waiting)

    @property
    def n_active(self) -> int:
        return len(self._batch.rows)

    # --- the engine thread -------------------------------------------------------------------

    def _run(self) -> None:
        torch.set_num_threads(self.session.launching_threads())
        try:
            with torch.inference_mode(), self.session.runtime(record_depth=self.record_depth) as runtime:
                self.runtime = runtime
                while self._next_requests():
                    self._admit(runtime)
                    if self._batch.rows:
                        self._guarded(self._decode_step, runtime)
        except BaseException as exc:  # noqa: BLE001 - the server reports it on /health and to every request
            with self._wake:
                self.failure = exc
                waiting, self._waiting = list(self._waiting), collections.deque()
            log.exception("the engine stopped")
            for row in self._batch.rows:
                row.fail(f"the engine stopped: {exc}")
            for request in waiting:
                request.deliver(Done("error", len(request.prompt_ids), 0, f"the engine stopped: {exc}"))
            self.on_failure()

    def _next_requests(self) -> bool:
        """Waits until there is work; False once stopping with nothing active or waiting."""
        with self._wake:
            while not self._batch.rows and not self._waiting:
                if self._stopping:
                    return False
                self._wake.wait()
            return True

    def _admit(self, runtime) -> None:
        while len(self._batch.rows) < self.max_batch and (self._mergeable or not self._batch.rows):
            with self._wake:
                if not self._waiting:
                    return
                request = self._waiting.popleft()
            if request.cancelled.is_set():
                request.deliver(Done("cancelled", len(request.prompt_ids), 0))
                continue
            self._guarded(self._prefill, runtime, request)

    def _guarded(self, step: Callable, runtime, *args) -> None:
        """Runs one forward step; when it raises, every active request and the one being prefilled
        (`args`) are told, and the batch starts again empty."""
        try:
            step(runtime, *args)
        except Exception as exc:  # noqa: BLE001 - one failed step must not end the server
            log.exception("a step failed")
            message = f"internal error: {type(exc).__name__}: {exc}"
            for row in self._batch.rows:
                row.fail(message)
            for request in args:
                request.deliver(Done("error", len(request.prompt_ids), 0, message))
            self.stats.n_finished["error"] += len(self._batch.rows) + len(args)
            self._batch = _Batch()

    @property
    def _device(self) -> torch.device:
        return self.session.accelerator.device

    def _forward(self, runtime, ids, mask, positions, cache, n_cached: int) -> torch.Tensor:
        """One forward step; returns the last position's logits [B, V]."""
        runtime.begin_step(ids.numel(), n_cached)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                         logits_to_keep=1)
        records = runtime.end_step()
        if self.on_trace_step is not None:
            self.on_trace_step(records)
        return out.logits[:, -1, :]

    def _prefill(self, runtime, request: Request) -> None:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        device = self._device
        ids = torch.tensor([request.prompt_ids], device=device)  # [1, S1]
        mask = torch.ones_like(ids)
        positions = torch.arange(ids.shape[1], device=device)[None]  # [1, S1]
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(runtime, ids, mask, positions, cache, 0)
        self._mergeable = all(type(layer) is DynamicLayer for layer in cache.layers)
        with self.tokenizer_lock:
            row = _Sequence(request, self.session.loaded.tokenizer, self._eos_ids, device)
            row.push(logits)
        self.stats.prefilled(len(request.prompt_ids))
        self.stats.step(1)
        if row.finish_reason is None:
            self._batch.add(row, cache, mask)
        else:
            self.stats.n_finished[row.finish_reason] += 1

    def _decode_step(self, runtime) -> None:
        batch, device = self._batch, self._device
        for row in batch.rows:
            row.cancel_if_asked()
        self._leave()
        if not batch.rows:
            return
        ids = torch.tensor([[row.last_token] for row in batch.rows], device=device)  # [B, 1]
        mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch.rows), 1)], dim=-1)  # [B, S + 1]
        positions = torch.tensor([[row.next_position] for row in batch.rows], device=device)  # [B, 1]
        logits = self._forward(runtime, ids, mask, positions, batch.cache, batch.mask.shape[1])
        batch.mask = mask
        with self.tokenizer_lock:
            for i, row in enumerate(batch.rows):
                row.next_position += 1
                row.push(logits[i : i + 1])
        self.stats.step(len(batch.rows))
        self._leave()

    def _leave(self) -> None:
        for row in self._batch.rows:
            if row.finish_reason is not None:
                self.stats.n_finished[row.finish_reason] += 1
        self._batch.drop_finished()
