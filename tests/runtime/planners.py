"""Small planners implementing the Planner protocol, to force every path of the runtime.

`RulePlanner` keeps real slot bookkeeping (which expert each slot holds, least recently used
first), decides per activated expert by a fixed rule, loads what it puts on the accelerator but is
not resident (into a slot no expert of this layer's plan uses), falls back to the CPU when no slot
can be freed, and prefetches the predicted experts of later layers into slots this layer does not use.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from hybrimoe.policy.plan import ExpertId, LayerPlan, SlotLoad

SCHEDULES = ("cpu", "accelerator", "mixed")


class RulePlanner:
    def __init__(
        self,
        schedule: str,
        capacity: int,
        n_layers: int,
        n_experts: int,
        prefetch_depth: int = 0,
        warm: bool = True,
    ):
        assert schedule in SCHEDULES
        self.schedule, self.capacity = schedule, capacity
        self.lookahead_layers = prefetch_depth
        self.holds: list[ExpertId | None] = [None] * capacity  # slot -> expert
        self.slot: dict[ExpertId, int] = {}
        self.last_use = [0] * capacity
        self.clock = 0
        all_experts = [(layer, e) for layer in range(n_layers) for e in range(n_experts)]
        self._warm = tuple(SlotLoad(eid, s) for s, eid in enumerate(all_experts[:capacity])) if warm else ()
        for load in self._warm:
            self._apply(load)
        self.predictions_seen: list[dict[int, np.ndarray]] = []

    def initial_loads(self) -> tuple[SlotLoad, ...]:
        return self._warm

    def begin_step(self, n_tokens: int, context_tokens: int) -> None:
        pass

    def _apply(self, load: SlotLoad) -> None:
        old = self.holds[load.slot]
        if old is not None:
            del self.slot[old]
        self.holds[load.slot] = load.expert
        self.slot[load.expert] = load.slot
        self.clock += 1
        self.last_use[load.slot] = self.clock

    def _victim(self, protected: set[int]) -> int | None:
        free = [s for s in range(self.capacity) if s not in protected]
        return min(free, key=lambda s: (self.holds[s] is not None, self.last_use[s])) if free else None

    def _wants_accelerator(self, rank: int) -> bool:
        if self.schedule == "mixed":
            return rank % 2 == 0  # every other activated expert, by id, resident or not
        return self.schedule == "accelerator"

    def plan_layer(
        self,
        layer: int,
        topk_ids: np.ndarray,  # [T, k]
        router_probs: np.ndarray | None,  # [T, E]
        predicted_topk: Mapping[int, np.ndarray],  # later layer -> [T, k]
    ) -> LayerPlan:
        assert router_probs is not None and router_probs.shape[0] == topk_ids.shape[0]
        self.predictions_seen.append(dict(predicted_topk))
        activated = sorted(set(topk_ids.reshape(-1).tolist()))
        gpu, load, cpu, loads, slot_of = [], [], [], [], {}
        protected = {self.slot[(layer, e)] for e in activated if (layer, e) in self.slot}
        for rank, expert in enumerate(activated):
            eid = (layer, expert)
            if not self._wants_accelerator(rank):
                cpu.append(expert)
            elif eid in self.slot:
                gpu.append(expert)
                slot_of[expert] = self.slot[eid]
            else:
                slot = self._victim(protected)
                if slot is None:
                    cpu.append(expert)
                    continue
                protected.add(slot)
                loads.append(SlotLoad(eid, slot))
                self._apply(loads[-1])
                load.append(expert)
                slot_of[expert] = slot
        for expert, slot in slot_of.items():
            self.clock += 1
            self.last_use[slot] = self.clock
        self._pending = (protected, predicted_topk)
        return LayerPlan(
            layer=layer,
            gpu=tuple(gpu),
            load=tuple(load),
            cpu=tuple(cpu),
            slot_of=slot_of,
            loads=tuple(loads),
            predicted_ms=0.0,
        )

    def plan_prefetch(self, plan) -> tuple[SlotLoad, ...]:
        protected, predicted_topk = self._pending
        prefetch = []
        for target in sorted(predicted_topk):
            for expert in sorted(set(predicted_topk[target].reshape(-1).tolist())):
                if (target, expert) in self.slot:
                    continue
                slot = self._victim(protected)
                if slot is None:
                    break
                protected.add(slot)
                prefetch.append(SlotLoad((target, expert), slot))
                self._apply(prefetch[-1])
        return tuple(prefetch)
