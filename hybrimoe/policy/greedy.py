"""HybriMoE's greedy list scheduler for one layer, stepped as the paper describes it.

Design choices:
- The greedy simulates three timelines (CPU, GPU, PCIe) and repeatedly gives the one that becomes
  free first its next task (`Greedy.run`; the steps are `_pcie_step`, `_gpu_step`, `_cpu_step`):
  * GPU: among resident experts not yet taken and copied experts that have arrived, the highest
    load first (a resident wins a tie); with nothing available it waits for the next arrival;
  * CPU: non-resident experts, lowest load first; when none are left, it takes resident experts
    away from the GPU queue, lowest load first; its first expert costs `cpu_first_extra_ms` more;
  * PCIe: considers the highest-load non-resident expert `x` the CPU has not started.
  Transfer rule: copy `x` only if it would finish on the GPU strictly before the CPU would finish
  it. GPU estimate: `max(now + load_ms, gpu_free + gpu work queued ahead of x) + gpu_ms(x)`, where
  the work ahead of `x` is every copy in flight or waiting and every queued resident expert whose
  load is >= x's (the GPU queue is in load order; residents win ties). CPU estimate: `cpu_free +
  cpu_ms of every non-resident expert still queued (x is the CPU's last, its load being the
  highest) + the first-expert extra if the CPU has not started`. When the rule says no, the copy
  engine stops for this layer: as time passes the CPU estimate stays put while the arrival time
  only grows, so a later copy would not help either.
  Ties between timelines free at the same instant go PCIe, then GPU, then CPU: the copy decision
  sees the queues before a compute engine takes from them, and a resident expert a free GPU can
  take stays on the GPU. Experts with equal loads are ordered by id (the CPU and PCIe queues are
  sorted by (load, id) ascending, the CPU taking from the front and the PCIe from the back; the
  resident queue by (-load, id), the GPU taking from the front and the CPU from the back), so
  results are deterministic.
  CPU guards (`schedule_hybrid`; `schedule_hybrid_paper` leaves them out): the paper's CPU always
  takes its next expert, which can be far from optimal (measured: up to 55x the exact optimum on
  random small layers, e.g. the CPU starting a 16-token expert that a copy would finish 20x
  sooner). So the CPU takes its next non-resident expert `y` only if it would not finish it later
  than a copy issued after every other queued non-resident expert would; if it declines, it leaves
  every remaining non-resident expert to the copy engine (which then copies without asking). It
  takes a resident expert only if it would finish it strictly before the GPU would (after the GPU's
  queued residents and in-flight copies of higher load); if it declines, it stops taking them.
  Declining is final: as time passes the CPU's estimates grow and the GPU's do not. Measured
  greedy/exact: at most 1.14 over 3000 random small layers with the guards.
  With the paper's worked example (unit costs in tests/policy/test_scheduler.py) both variants
  yield the paper's split: the CPU runs A, B then the resident E; the GPU runs D; C is copied and
  run on the GPU.
- It works on loads alone (token counts, through the cost model), in rank form: positions into
  [non-resident experts by (load, id)] + [resident experts by (-load, id)], so `scheduler.py`
  can memoize a result and map it back to any experts with the same loads.
"""

from __future__ import annotations

from hybrimoe.policy.costs import CostModel

_INF = float("inf")

# Rank-form result: index tuples (GPU order, copy order, CPU order), then cpu_end_ms, gpu_end_ms,
# pcie_end_ms, finish_ms and when each copy lands.
Ranked = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], float, float, float, float, tuple[float, ...]]


class Greedy:
    """HybriMoE's list scheduler for one layer, on loads alone (see the module docstring).

    Two queues: the non-resident experts `non_loads[non_first:non_end]` (ascending: the CPU takes
    from the front, the copy engine from the back) and the resident ones
    `res_loads[res_first:res_end]` (descending: the GPU takes from the front, the CPU steals from
    the back). Each pass lets the timeline that is free first (PCIe, then GPU, then CPU on ties)
    take its step. Positions are indices into [non-resident] + [resident] (the rank form).
    """

    def __init__(self, non_loads: list[int], res_loads: list[int], costs: CostModel, pcie_free_ms: float,
                 guarded: bool):
        self.non_loads, self.res_loads, self.guarded = non_loads, res_loads, guarded
        self.load_ms = costs.load_ms
        self.non_cpu_ms, self.non_gpu_ms = list(map(costs.cpu_ms, non_loads)), list(map(costs.gpu_ms, non_loads))
        self.res_cpu_ms, self.res_gpu_ms = list(map(costs.cpu_ms, res_loads)), list(map(costs.gpu_ms, res_loads))
        self.n_non = len(non_loads)
        self.non_first, self.non_end = 0, self.n_non
        self.res_first, self.res_end = 0, len(res_loads)
        self.queued_cpu_ms = sum(self.non_cpu_ms)  # CPU cost of the non-resident queue
        self.queued_non_gpu_ms = sum(self.non_gpu_ms)  # GPU cost of the non-resident queue
        self.queued_res_gpu_ms = sum(self.res_gpu_ms)  # GPU cost of the resident queue
        self.arrivals: list[float] = []  # when each copy lands, in issue order
        self.copied: list[int] = []  # the non-resident index of each copy
        self.next_copy = 0  # copies before this one are computed already
        self.copies_gpu_ms = 0.0  # GPU cost of the copies not computed yet
        self.gpu_order: list[int] = []
        self.cpu_order: list[int] = []
        self.cpu_free_ms = self.gpu_free_ms = self.gpu_end_ms = 0.0
        self.pcie_free_ms, self.pcie_start_ms = pcie_free_ms, pcie_free_ms
        self.copying = self.n_non > 0  # False once the copy rule said no: no more copies this layer
        self.copy_rule_decides = True  # False once the CPU left every non-resident expert to copies
        self.cpu_takes_non_resident = self.cpu_steals = True
        self.cpu_startup_ms = costs.cpu_first_extra_ms  # until the CPU takes its first expert

    def run(self) -> Ranked:
        # Each pass places an expert, computes a copied one or turns a rule off: a bound no input exceeds.
        for _ in range(2 * self.n_non + len(self.res_loads) + 4):
            gpu_at, cpu_at, pcie_at = self._gpu_ready_ms(), self._cpu_ready_ms(), self._pcie_ready_ms()
            if pcie_at <= gpu_at and pcie_at <= cpu_at:
                if pcie_at == _INF:
                    return self._result()
                self._pcie_step()
            elif gpu_at <= cpu_at:
                self._gpu_step(gpu_at)
            else:
                self._cpu_step()
        raise RuntimeError(
            f"the hybrid schedule did not finish (costs: CPU {self.non_cpu_ms + self.res_cpu_ms} ms, GPU "
            f"{self.non_gpu_ms + self.res_gpu_ms} ms, load {self.load_ms} ms): a cost is not a finite number"
        )

    # -- when each timeline can next act (inf: nothing to do, now or later) ---------------------

    def _copy_landed(self) -> bool:
        return self.next_copy < len(self.arrivals) and self.arrivals[self.next_copy] <= self.gpu_free_ms

    def _gpu_ready_ms(self) -> float:
        if self.res_first < self.res_end or self._copy_landed():
            return self.gpu_free_ms
        return self.arrivals[self.next_copy] if self.next_copy < len(self.arrivals) else _INF

    def _cpu_ready_ms(self) -> float:
        has_work = (self.cpu_takes_non_resident and self.non_first < self.non_end) or (
            self.cpu_steals and self.res_first < self.res_end)
        return self.cpu_free_ms if has_work else _INF

    def _pcie_ready_ms(self) -> float:
        return self.pcie_free_ms if self.copying and self.non_first < self.non_end else _INF

    # -- the three steps -------------------------------------------------------------------------

    def _pcie_step(self) -> None:
        """Copies the highest-load non-resident expert x, if the copy rule says it helps."""
        x = self.non_end - 1
        if self.copy_rule_decides and self._copy_finishes_ms(x) >= self._cpu_finishes_queue_ms():
            self.copying = False
            return
        self.non_end = x
        self.queued_cpu_ms -= self.non_cpu_ms[x]
        self.queued_non_gpu_ms -= self.non_gpu_ms[x]
        self.copies_gpu_ms += self.non_gpu_ms[x]
        self.pcie_free_ms += self.load_ms
        self.arrivals.append(self.pcie_free_ms)
        self.copied.append(x)

    def _copy_finishes_ms(self, x: int) -> float:
        """When the GPU would finish non-resident expert x if it were copied now: after the copies
        not yet computed and the queued residents of load >= x's."""
        x_load, res_loads = self.non_loads[x], self.res_loads
        if self.res_first == self.res_end or res_loads[self.res_end - 1] >= x_load:
            ahead_ms = self.copies_gpu_ms + self.queued_res_gpu_ms
        else:
            ahead_ms, i = self.copies_gpu_ms, self.res_first
            while res_loads[i] >= x_load:
                ahead_ms += self.res_gpu_ms[i]
                i += 1
        arrival_ms = self.pcie_free_ms + self.load_ms
        ready_ms = max(self.gpu_free_ms, self.pcie_free_ms) + ahead_ms
        return max(arrival_ms, ready_ms) + self.non_gpu_ms[x]

    def _cpu_finishes_queue_ms(self) -> float:
        return self.cpu_free_ms + self.queued_cpu_ms + self.cpu_startup_ms

    def _gpu_step(self, gpu_at: float) -> None:
        """The GPU computes its next expert: the first resident, unless a landed copy has more load."""
        self.gpu_free_ms = gpu_at
        first = self.res_first
        if first < self.res_end and not (
            self._copy_landed() and self.non_loads[self.copied[self.next_copy]] > self.res_loads[first]
        ):
            self.gpu_free_ms += self.res_gpu_ms[first]
            self.queued_res_gpu_ms -= self.res_gpu_ms[first]
            self.gpu_order.append(self.n_non + first)
            self.res_first += 1
        else:
            x = self.copied[self.next_copy]
            self.gpu_free_ms += self.non_gpu_ms[x]
            self.copies_gpu_ms -= self.non_gpu_ms[x]
            self.next_copy += 1
        self.gpu_end_ms = self.gpu_free_ms

    def _cpu_step(self) -> None:
        """The CPU takes its lowest-load non-resident expert, else steals the lowest-load resident
        one; with the guards, only when that does not finish later than the alternative."""
        if self.cpu_takes_non_resident and self.non_first < self.non_end:
            y = self.non_first
            if self.guarded and self.copying and self.copy_rule_decides and self._copy_beats_cpu(y):
                self.cpu_takes_non_resident = self.copy_rule_decides = False
                return
            self.cpu_free_ms += self.cpu_startup_ms + self.non_cpu_ms[y]
            self.queued_cpu_ms -= self.non_cpu_ms[y]
            self.queued_non_gpu_ms -= self.non_gpu_ms[y]
            self.cpu_order.append(y)
            self.non_first += 1
        else:
            r = self.res_end - 1
            if self.guarded and self.cpu_free_ms + self.cpu_startup_ms + self.res_cpu_ms[r] >= self._gpu_finishes_ms(r):
                self.cpu_steals = False
                return
            self.res_end = r
            self.cpu_free_ms += self.cpu_startup_ms + self.res_cpu_ms[r]
            self.queued_res_gpu_ms -= self.res_gpu_ms[r]
            self.cpu_order.append(self.n_non + r)
        self.cpu_startup_ms = 0.0

    def _copy_beats_cpu(self, y: int) -> bool:
        """Whether copying non-resident y after every other queued one still beats the CPU on it."""
        cpu_free_ms = self.cpu_free_ms
        arrival_ms = max(self.pcie_free_ms, cpu_free_ms) + (self.non_end - self.non_first) * self.load_ms
        ready_ms = max(self.gpu_free_ms, cpu_free_ms) + self.copies_gpu_ms + self.queued_res_gpu_ms
        ready_ms += self.queued_non_gpu_ms - self.non_gpu_ms[y]
        return max(arrival_ms, ready_ms) + self.non_gpu_ms[y] < cpu_free_ms + self.cpu_startup_ms + self.non_cpu_ms[y]

    def _gpu_finishes_ms(self, r: int) -> float:
        """When the GPU would finish resident r: after its queued residents and the copies in
        flight of higher load."""
        done_ms = max(self.gpu_free_ms, self.cpu_free_ms) + self.queued_res_gpu_ms
        for i in range(self.next_copy, len(self.arrivals)):
            if self.non_loads[self.copied[i]] > self.res_loads[r]:
                done_ms += self.non_gpu_ms[self.copied[i]]
        return done_ms

    def _result(self) -> Ranked:
        cpu_end_ms, gpu_end_ms = self.cpu_free_ms, self.gpu_end_ms
        return (
            tuple(self.gpu_order),
            tuple(self.copied),
            tuple(self.cpu_order),
            cpu_end_ms,
            gpu_end_ms,
            self.arrivals[-1] if self.arrivals else self.pcie_start_ms,
            max(cpu_end_ms, gpu_end_ms),
            tuple(self.arrivals),
        )
