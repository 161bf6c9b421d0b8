"""One MoE layer of one forward step: route -> plan -> CPU worker | loads + accelerator -> combine.

Shapes: T = tokens in the step (all sequences), k = top-k, E = experts per layer, D = hidden size,
P = T * k token-expert pairs, grouped by expert (a stable sort of the flat routing; pair p is
token p // k's choice p % k); `span[e]` is expert e's (start, stop) in that order.

Design choices:
- The planner sees this layer's routing, its full router probabilities and the later layers'
  predicted routing (their routers applied to this layer's hidden state); it returns plain data.
- Routing replay (optional): each step, at MoE layer 0, the replay hands out the next T tokens of
  a recorded trace; every layer then uses the trace's experts in place of the router's, and
  everything after (plan, records, expert runs, combine) sees only the replayed routing. Weights
  are the trace's when recorded; otherwise the router probabilities at the replayed experts,
  renormalised per token when the model's own weights sum to 1 (so the scale matches the model's
  routing). Router probabilities are the trace's when recorded, else the model's own. The later
  layers' predictions stay the model's routers' (the trace has no gates to run).
- Order of work: CPU experts are handed to a worker thread first (it waits on the event of the
  hidden states' copy), then this layer's loads go on the copy stream, then the accelerator
  experts (each waits on its slot's `ready` event), then the planner chooses the prefetches while
  those experts run, then the prefetches are issued (each waits on its slot's `free` event,
  recorded after this layer's kernels), then the CPU results are added.
- Every expert is weighted by its own routing weights: pairs are grouped by expert once and the
  weights are taken through the same grouping, on the host and on the accelerator alike.
- Weighted expert outputs are summed in float32 and cast to the model's dtype once (as
  transformers' grouped_mm path does); routers may return float32 weights for bfloat16 models.
- Plans are checked (every activated expert exactly once; resident experts really resident), so a
  planner bug raises instead of silently mixing experts up.
- Per-layer host work is a few numpy calls on P integers; the sync points are named below.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from hybrimoe.policy.plan import LayerPlan, Planner
from hybrimoe.runtime.accelerator import Accelerator
from hybrimoe.runtime.kernels import expert_mlp
from hybrimoe.runtime.loading import MoeLayer
from hybrimoe.runtime.replay import RoutingReplay
from hybrimoe.runtime.stats import ExpertCounters
from hybrimoe.runtime.store import ExpertStore


class LayerRecord:
    """What one MoE layer of one step routed, for the routing trace."""

    __slots__ = ("topk_ids", "topk_weights", "router_probs", "lookahead")

    def __init__(self, topk_ids, topk_weights, router_probs, lookahead):
        self.topk_ids = topk_ids  # [T, k] int
        self.topk_weights = topk_weights  # [T, k] float32
        self.router_probs = router_probs  # [T, E] float32
        self.lookahead = lookahead  # later layer -> [T, k] predicted experts


class LayerExecutor:
    def __init__(
        self,
        layers: Sequence[MoeLayer],
        store: ExpertStore,
        planner: Planner,
        accelerator: Accelerator,
        n_experts: int,
        counters: ExpertCounters,
        record_depth: int | None = None,
        replay: RoutingReplay | None = None,
    ):
        """`record_depth`: keep each layer's routing with this many later layers' predictions.
        `replay`: route every layer as this recorded trace says instead of as the router does."""
        self.store, self.planner, self.accelerator = store, planner, accelerator
        self.n_experts, self.counters = n_experts, counters
        self.routers = [layer.router for layer in layers]
        self._gates = [layer.experts._apply_gate for layer in layers]
        self._transposed = [bool(layer.experts.is_transposed) for layer in layers]
        # DeepSeek-V3-style routers score experts with a sigmoid (and a correction bias for choosing)
        self._sigmoid = [hasattr(layer.router, "e_score_correction_bias") for layer in layers]
        self.router_logits: list[torch.Tensor | None] = [None] * len(layers)  # set by the router hooks
        self.plan_depth = planner.lookahead_layers
        self.record_depth = record_depth
        self.records: list[LayerRecord] = []  # this step's layers, when recording
        self._pending_prefetch: dict[int, set[int]] = {}  # layer -> experts prefetched for its next run
        self.replay = replay
        # this step's replayed routing on the device: ids [L, T, k], weights [L, T, k] | None, probs [L, T, E] | None
        self._replayed: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None = None
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hybrimoe-cpu")

    def close(self) -> None:
        self._worker.shutdown(wait=True)

    def end_step(self) -> list[LayerRecord]:
        """Closes a forward step: returns its per-layer records (empty unless recording)."""
        records, self.records = self.records, []
        return records

    # -----------------------------------------------------------------------------------------

    def run(
        self,
        layer: int,
        x: torch.Tensor,  # [T, D]
        topk_ids: torch.Tensor,  # [T, k]
        topk_weights: torch.Tensor,  # [T, k]
    ) -> torch.Tensor:  # [T, D]
        acc, store, k = self.accelerator, self.store, topk_ids.shape[-1]
        if self.replay is not None:
            topk_ids, topk_weights, probs = self._replay_layer(layer, x, topk_ids, topk_weights)
        else:
            probs = self._router_probs(layer)  # [T, E]
        depth = max(self.plan_depth, self.record_depth or 0)
        later = list(range(layer + 1, min(layer + 1 + depth, len(self.routers))))
        # Later layers' routers on this hidden state; calling `forward` skips the capture hook.
        predicted = [type(self.routers[j]).forward(self.routers[j], x)[2] for j in later]
        to_host = [topk_ids, probs, *predicted]
        if self.record_depth is not None:
            to_host.append(topk_weights.float())
        # Sync point (CUDA): the planner needs this layer's routing on the host.
        ids, probs, *rest = acc.to_host_arrays(to_host)
        predicted_h = dict(zip(later, rest[: len(later)]))
        if self.record_depth is not None:
            lookahead = {j: predicted_h[j] for j in later[: self.record_depth]}
            self.records.append(LayerRecord(ids, rest[-1], probs, lookahead))
        predicted_plan = {j: predicted_h[j] for j in later[: self.plan_depth]}
        started_ns = time.perf_counter_ns()
        plan = self.planner.plan_layer(layer, ids, probs, predicted_plan)
        self.counters.planning_ns += time.perf_counter_ns() - started_ns
        self.counters.layers_planned += 1

        # group the P token-expert pairs by expert; pairs[0] = pair index, pairs[1] = its token
        flat = ids.reshape(-1)  # [P]
        order = np.argsort(flat, kind="stable")  # [P]
        counts = np.bincount(flat, minlength=self.n_experts)  # [E]
        activated = np.flatnonzero(counts)
        self._check_plan(plan, activated)
        self._count(layer, plan, activated)
        stops = np.cumsum(counts)[activated]
        span = dict(zip(activated.tolist(), zip((stops - counts[activated]).tolist(), stops.tolist())))
        pairs = np.stack([order, order // k])  # [2, P]

        cpu_future = self._submit_cpu(plan, x, topk_weights, pairs, span) if plan.cpu else None
        if plan.loads:
            self.counters.loads += store.load(plan.loads)
        on_accelerator = plan.gpu + plan.load
        store.check_resident(layer, plan.slot_of, on_accelerator)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [T, D]
        if on_accelerator:
            order_d, token_d = acc.index_to_device(pairs)  # [P] each
            weight_d = topk_weights.reshape(-1)[order_d]  # [P]
            x_d = x[token_d]  # [P, D]
            for expert in on_accelerator:
                start, stop = span[expert]
                y = self._expert(layer, x_d[start:stop], store.weights(plan.slot_of[expert]))
                out.index_add_(0, token_d[start:stop], (y * weight_d[start:stop, None]).float())
            store.release(plan.slot_of[e] for e in on_accelerator)
        # The prefetch choice runs while this layer's experts run (the CPU worker's, and the
        # accelerator's kernels queued above), so it does not delay the layer's start.
        started_ns = time.perf_counter_ns()
        prefetch = self.planner.plan_prefetch()
        self.counters.prefetch_planning_ns += time.perf_counter_ns() - started_ns
        if prefetch:
            self.counters.prefetches += store.load(prefetch)
            for load in prefetch:
                self._pending_prefetch.setdefault(load.expert[0], set()).add(load.expert[1])
        self.counters.bytes_loaded += (len(plan.loads) + len(prefetch)) * store.expert_bytes
        if cpu_future is not None:
            # Sync point: wait for the CPU worker's experts of this layer.
            out.add_(acc.to_device(cpu_future.result()))
        return out.to(x.dtype)

    # -----------------------------------------------------------------------------------------

    def _replay_layer(
        self,
        layer: int,
        x: torch.Tensor,  # [T, D]
        topk_ids: torch.Tensor,  # [T, k]: the router's, for their dtype
        topk_weights: torch.Tensor,  # [T, k]: the router's, for their dtype and normalisation
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # ids [T, k], weights [T, k], probs [T, E]
        """This layer's routing from the replayed trace, on x's device."""
        if layer == 0:  # a new forward step: the next T tokens of the trace
            step = self.replay.next_step(x.shape[0])
            # pinned copies on the compute stream (no sync); the step's later layers reuse them
            self._replayed = tuple(
                None if a is None else self.accelerator.index_to_device(np.ascontiguousarray(a)) for a in step
            )
        ids_all, weights_all, probs_all = self._replayed
        if ids_all.shape[1] != x.shape[0]:
            raise RuntimeError(f"layer {layer} runs {x.shape[0]} tokens; its step replayed {ids_all.shape[1]}")
        ids = ids_all[layer]  # [T, k] int64
        probs = self._router_probs(layer) if probs_all is None else probs_all[layer]  # [T, E]
        if weights_all is not None:
            weights = weights_all[layer]  # [T, k]
        else:
            weights = probs.gather(1, ids)  # [T, k]
            # a 0-d flag kept on the device (no sync): the model's routing normalises its weights
            normalised = ((topk_weights.float().sum(dim=-1) - 1.0).abs() <= 1e-3).all()
            weights = torch.where(normalised, weights / weights.sum(dim=-1, keepdim=True), weights)
        return ids.to(topk_ids.dtype), weights.to(topk_weights.dtype), probs

    def _router_probs(self, layer: int) -> torch.Tensor:  # [T, E] float32
        logits = self.router_logits[layer].float()
        return logits.sigmoid() if self._sigmoid[layer] else logits.softmax(dim=-1)

    def _expert(self, layer: int, x: torch.Tensor, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        return expert_mlp(
            x,
            weights["gate_up_proj"],
            weights["down_proj"],
            apply_gate=self._gates[layer],
            gate_up_bias=weights.get("gate_up_proj_bias"),
            down_bias=weights.get("down_proj_bias"),
            transposed=self._transposed[layer],
        )

    def _check_plan(self, plan: LayerPlan, activated: np.ndarray) -> None:
        planned = sorted((*plan.gpu, *plan.load, *plan.cpu))
        if planned != activated.tolist():
            raise RuntimeError(
                f"planner bug: layer {plan.layer} plans experts {planned}, but {activated.tolist()} are activated"
            )

    def _count(self, layer: int, plan: LayerPlan, activated: np.ndarray) -> None:
        counters, slot_of = self.counters, self.store.slot_of
        resident = [e for e in activated.tolist() if (layer, e) in slot_of]
        counters.activations += len(activated)
        counters.hits += len(resident)
        counters.accelerator_runs += len(plan.gpu) + len(plan.load)
        counters.cpu_runs += len(plan.cpu)
        counters.planned_ms += plan.predicted_ms
        prefetched = self._pending_prefetch.pop(layer, None)
        if prefetched:
            counters.prefetches_used += len(prefetched.intersection(resident))

    def _submit_cpu(self, plan, x, topk_weights, pairs, span) -> Future:
        (x_h, weights_h), copied = self.accelerator.to_host_async([x, topk_weights])
        return self._worker.submit(self._run_cpu, plan.layer, plan.cpu, x_h, weights_h, copied, pairs, span)

    def _run_cpu(self, layer, experts, x_h, weights_h, copied, pairs, span) -> torch.Tensor:
        """The CPU worker: this layer's CPU experts from host memory, summed into one [T, D]."""
        with torch.inference_mode():
            if copied is not None:
                copied.synchronize()  # Sync point (worker only): the hidden states reached the host.
            out = self.accelerator.host_zeros(x_h.shape, torch.float32)  # [T, D]
            order, tokens = torch.from_numpy(pairs)  # [P] each
            weights_flat = weights_h.reshape(-1)  # [P], in routing order
            for expert in experts:
                start, stop = span[expert]
                rows = tokens[start:stop]  # this expert's tokens only: the CPU gathers no other rows
                y = self._expert(layer, x_h[rows], self.store.host_weights(layer, expert))
                out.index_add_(0, rows, (y * weights_flat[order[start:stop], None]).float())
            return out
