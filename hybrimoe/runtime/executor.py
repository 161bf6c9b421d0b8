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
- Host waits: this layer's routing is copied to the host first and the host waits for that copy
  only; the later layers' routers and their copies are queued behind it and run while the host
  plans; the planner reads their predictions (and so waits for them) only when it protects
  experts for an admit or chooses prefetches (`PendingArrays`). The rest of the per-layer host
  work (planning excluded) is what `hybrimoe profile` measures as the executor's host cost.
- Order of work: CPU experts are handed to a worker thread first (it waits on the event of the
  hidden states' copy), then this layer's loads go on the copy stream, then the accelerator
  experts (after their slots' `ready` events), then the planner chooses the prefetches while
  those experts run, then the prefetches are issued (each waits on its slot's `free` event,
  recorded after this layer's kernels), then the CPU results are added.
- Each side runs its experts as one grouped kernel per projection (`kernels.py`): the accelerator
  over the slots' stacked weights (pairs grouped by slot), the CPU worker over the layer's stacked
  host weights (pairs grouped by expert). Every pair is weighted by its own routing weight, taken
  through the same grouping. Experts with few tokens on the CPU run the native kernels instead
  (`native/`: the whole side in one call, weights read once at the memory's bandwidth) where
  they serve the weights' format. On the CPU stand-in, a layer with nothing on the "accelerator"
  runs its CPU experts on the calling thread (with the worker's thread count): there is nothing
  to overlap them with.
- Weighted expert outputs are summed in float32 and cast to the model's dtype once (as
  transformers' grouped_mm path does); routers may return float32 weights for bfloat16 models.
- Plans are checked (every activated expert exactly once; resident experts really resident), so a
  planner bug raises instead of silently mixing experts up.
- Per-layer host work is a few numpy calls on P integers; the sync points are named below.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from hybrimoe.policy.plan import LayerPlan, Planner
from hybrimoe.runtime import native
from hybrimoe.runtime.accelerator import Accelerator
from hybrimoe.runtime.kernels import Groups, GroupIndex, group_pairs, grouped_experts_mlp, split_indices
from hybrimoe.runtime.loading import MoeLayer
from hybrimoe.runtime.replay import RoutingReplay
from hybrimoe.runtime.stats import RunCounters
from hybrimoe.runtime.store import ExpertStore
from hybrimoe.runtime.threads import torch_threads


class PendingArrays(Mapping):
    """Later layer -> [T, k] predicted experts, copied to the host behind this layer's routing: the
    first read of a value waits for the copies (the planner reads them only to protect or prefetch)."""

    def __init__(self, layers: list[int], host: list[torch.Tensor], ready, accelerator: Accelerator):
        self._layers, self._host, self._ready, self._accelerator = layers, host, ready, accelerator
        self._arrays: dict[int, np.ndarray] | None = None

    def head(self, n: int) -> PendingArrays:
        """The first `n` later layers only."""
        return PendingArrays(self._layers[:n], self._host[:n], self._ready, self._accelerator)

    def __getitem__(self, layer: int) -> np.ndarray:
        if self._arrays is None:
            self._accelerator.wait_host(self._ready)  # Sync point (CUDA): the predictions' copies
            self._arrays = {j: h.numpy() for j, h in zip(self._layers, self._host)}
        return self._arrays[layer]

    def __iter__(self) -> Iterator[int]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)


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
        counters: RunCounters,
        record_depth: int | None = None,
        replay: RoutingReplay | None = None,
        cpu_threads: int | None = None,
    ):
        """`record_depth`: keep each layer's routing with this many later layers' predictions.
        `replay`: route every layer as this recorded trace says instead of as the router does.
        `cpu_threads`: the CPU expert worker's intra-op threads (None: torch's default)."""
        self.store, self.planner, self.accelerator = store, planner, accelerator
        self.n_experts, self.counters = n_experts, counters
        self.routers = [layer.router for layer in layers]
        self._gates = [layer.experts._apply_gate for layer in layers]
        self._standard_gate = [native.standard_gate(layer.experts) for layer in layers]
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
        self._cpu_threads = cpu_threads
        self._worker = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="hybrimoe-cpu",
            initializer=None if cpu_threads is None else torch.set_num_threads,
            initargs=() if cpu_threads is None else (cpu_threads,),
        )

    def worker_threads(self) -> int:
        """The intra-op threads the CPU expert worker really runs with."""
        return self._worker.submit(torch.get_num_threads).result()

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
        acc, store = self.accelerator, self.store
        if self.replay is not None:
            topk_ids, topk_weights, probs = self._replay_layer(layer, x, topk_ids, topk_weights)
        else:
            probs = self._router_probs(layer)  # [T, E]
        routing = [topk_ids, probs] if self.record_depth is None else [topk_ids, probs, topk_weights.float()]
        routing_h, routing_ready = acc.to_host_async(routing)
        lookahead = self._predict_later_layers(layer, x)
        # Sync point (CUDA): this layer's routing reaches the host; the later layers' routers and
        # their copies, queued behind it, keep running while the host plans.
        acc.wait_host(routing_ready)
        ids, probs = routing_h[0].numpy(), routing_h[1].numpy()
        if self.record_depth is not None:
            self.records.append(LayerRecord(ids, routing_h[2].numpy(), probs, lookahead.head(self.record_depth)))
        started_ns = time.perf_counter_ns()
        plan = self.planner.plan_layer(layer, ids, probs, lookahead.head(self.plan_depth))
        self.counters.planning_ns += time.perf_counter_ns() - started_ns
        self.counters.layers_planned += 1

        # group the P token-expert pairs by expert
        flat = ids.reshape(-1)  # [P]
        order = np.argsort(flat, kind="stable")  # [P]: pair p is token p // k's choice p % k
        counts = np.bincount(flat, minlength=self.n_experts)  # [E]
        activated = np.flatnonzero(counts)
        self._check_plan(plan, activated)
        self._count(layer, plan, activated)
        stops = np.cumsum(counts)[activated]
        span = dict(zip(activated.tolist(), zip((stops - counts[activated]).tolist(), stops.tolist())))

        on_accelerator = plan.gpu + plan.load
        # the CPU stand-in with nothing on its "accelerator": nothing to overlap, so the CPU experts
        # run on this thread below (handing them to the worker costs two thread switches)
        cpu_inline = bool(plan.cpu) and not (on_accelerator or acc.is_cuda)
        cpu_groups = group_pairs(order, span, {expert: expert for expert in plan.cpu}) if plan.cpu else None
        cpu_future = None if cpu_groups is None or cpu_inline else self._submit_cpu(plan.layer, cpu_groups, x, topk_weights)
        if plan.loads:
            self.counters.demand_loads += store.load(plan.loads)
        store.check_resident(layer, plan.slot_of, on_accelerator)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [T, D]
        if on_accelerator:
            slots = {expert: plan.slot_of[expert] for expert in on_accelerator}
            self._run_on_accelerator(layer, x, topk_weights, group_pairs(order, span, slots), slots.values(), out)
        # The prefetch choice runs while this layer's experts run (the CPU worker's, and the
        # accelerator's kernels queued above), so it does not delay the layer's start.
        started_ns = time.perf_counter_ns()
        prefetch = self.planner.plan_prefetch(plan)
        self.counters.prefetch_planning_ns += time.perf_counter_ns() - started_ns
        if prefetch:
            self.counters.prefetch_loads += store.load(prefetch)
            for load in prefetch:
                self._pending_prefetch.setdefault(load.expert[0], set()).add(load.expert[1])
        self.counters.bytes_loaded += (len(plan.loads) + len(prefetch)) * store.expert_bytes
        if cpu_inline:
            with torch_threads(self._cpu_threads):
                out.add_(self._run_cpu(plan.layer, cpu_groups, x, topk_weights, None))
        if cpu_future is not None:
            # Sync point: wait for the CPU worker's experts of this layer.
            out.add_(acc.to_device(cpu_future.result()))
        return out.to(x.dtype)

    def _run_on_accelerator(
        self, layer: int, x: torch.Tensor, topk_weights: torch.Tensor, groups: Groups, slots, out: torch.Tensor
    ) -> None:
        """Queues the layer's accelerator experts (grouped by slot) and adds their weighted rows to
        `out` [T, D]; the slots are read only after their copies, and freed after these kernels."""
        acc, store = self.accelerator, self.store
        # one pinned copy of the rows' pair indices and the groups' index arrays
        pairs_d, index_d = split_indices(acc.index_to_device(groups.index_arrays()), groups)
        store.wait_ready(slots)
        self._add_experts(layer, x, topk_weights, pairs_d, index_d, groups, store.slots, out)
        store.release(slots)

    def _add_experts(
        self,
        layer: int,
        x: torch.Tensor,  # [T, D]
        topk_weights: torch.Tensor,  # [T, k]
        pairs: torch.Tensor,  # [R] the groups' pair indices, group after group
        index: GroupIndex,  # the groups' index arrays on x's device
        groups: Groups,
        stacked: dict[str, torch.Tensor],  # the weights the groups index: [N, ...] each
        out: torch.Tensor,  # [T, D] float32, added to
    ) -> None:
        """Adds each pair's routing weight times its expert's output on its token to `out`."""
        k = topk_weights.shape[-1]
        if native.runs(stacked, x, groups.max_rows, self._standard_gate[layer]):
            experts, ends = groups.run_arrays()
            native.add_experts(out, x, groups.pairs // k, topk_weights.reshape(-1)[pairs], experts, ends, stacked)
            return
        tokens = pairs // k  # [R]: only the groups' rows are gathered
        y = grouped_experts_mlp(x[tokens], stacked, groups, index, self._gates[layer], self._transposed[layer])  # [R, D]
        out.index_add_(0, tokens, (y * topk_weights.reshape(-1)[pairs, None]).float())

    def _predict_later_layers(self, layer: int, x: torch.Tensor) -> PendingArrays:
        """The later layers' routers on this hidden state (as far as planning and recording look),
        queued with their copies to the host; calling `forward` skips the capture hook."""
        depth = max(self.plan_depth, self.record_depth or 0)
        later = list(range(layer + 1, min(layer + 1 + depth, len(self.routers))))
        predicted = [type(self.routers[j]).forward(self.routers[j], x)[2] for j in later]  # [T, k] each
        predicted_h, ready = self.accelerator.to_host_async(predicted)
        return PendingArrays(later, predicted_h, ready, self.accelerator)

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
            used = prefetched.intersection(resident)
            counters.prefetch_used += len(used)
            # a prefetch still copying as the layer starts: its kernels will wait on its slot's event
            counters.waited_hits += sum(self.store.copying(slot_of[(layer, e)]) for e in used)

    def _submit_cpu(self, layer: int, groups: Groups, x, topk_weights) -> Future:
        (x_h, weights_h), copied = self.accelerator.to_host_async([x, topk_weights])
        return self._worker.submit(self._run_cpu, layer, groups, x_h, weights_h, copied)

    def _run_cpu(self, layer: int, groups: Groups, x_h, weights_h, copied) -> torch.Tensor:
        """The CPU worker: this layer's CPU experts from host memory, summed into one [T, D]."""
        with torch.inference_mode():
            self.accelerator.wait_host(copied)  # Sync point (worker only): the hidden states reached the host.
            out = self.accelerator.host_zeros(x_h.shape, torch.float32)  # [T, D]
            pairs, index = split_indices(torch.from_numpy(groups.index_arrays()), groups)
            self._add_experts(layer, x_h, weights_h, pairs, index, groups, self.store.host_layer(layer), out)
            return out
