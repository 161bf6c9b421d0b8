"""Intra-layer scheduling: which activated experts run on the GPU, which are copied in, which run on the CPU.

Every function here has the same signature (`ScheduleFn`) and returns a `LayerSchedule`; times are
ms from the start of the layer's expert phase.

Design choices:
- `schedule_hybrid` is HybriMoE's greedy list scheduler. It simulates three timelines (CPU, GPU,
  PCIe) and repeatedly gives the one that becomes free first its next task:
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
- Memoization: the greedy's decisions depend on the experts only through their loads and through
  the rank of each expert in its sorted queue, so a result is computed once per (resident loads
  sorted, non-resident loads sorted, pcie_free_at_ms) and stored as indices into the
  concatenation [non-resident experts by (load, id)] + [resident experts by (-load, id)]; a call
  sorts its experts the same way and maps the indices back to ids. Decode (every count 1) keys on
  just (resident count, non-resident count, pcie_free_at_ms). The memo lives on the `CostModel`
  (`schedule_memo`), so do not change a cost model's fields after its first use; make a new one, as
  `CostModel.without_loads` does. It is cleared when it reaches `_MEMO_MAX` entries.
- `schedule_exact` is the optimum under the same timing model, by enumeration of each expert's
  side (CPU, or GPU with a copy when not resident). For a fixed split the CPU's order does not
  change its end, any GPU order without needless idling gives the same GPU end (single machine,
  release dates), and with a constant `load_ms` copying in decreasing `gpu_ms` order minimises it
  (exchange argument), so enumerating the 2^n splits is exact.
- Baselines share the timing model: `schedule_static` (resident on GPU, the rest on CPU, no copies:
  kTransformers / llama.cpp decode), `schedule_gpu_only` (every miss copied on demand, highest load
  first: accelerate-style offload) and `schedule_cpu_only`. Without an accelerator
  (`costs.has_accelerator` False) every function returns the CPU-only schedule.
- Counts must be positive; an expert with no tokens should not be passed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from collections.abc import Set as AbstractSet
from operator import itemgetter
from typing import NamedTuple

from hybrimoe.policy.costs import CostModel

EXACT_MAX_EXPERTS = 12
_MEMO_MAX = 1 << 16
_INF = float("inf")


class LayerSchedule(NamedTuple):
    gpu: tuple[int, ...]  # resident experts computed on the GPU, in this order
    load: tuple[int, ...]  # non-resident experts copied in this order, each then computed on the GPU
    cpu: tuple[int, ...]  # experts computed on the CPU, in this order (may include resident ones)
    cpu_end_ms: float  # when the CPU finishes its last expert (0 when it has none)
    gpu_end_ms: float  # when the GPU finishes its last expert, copied ones included (0 when none)
    pcie_end_ms: float  # when the copy engine is free again (pcie_free_at_ms when nothing is copied)
    finish_ms: float  # max(cpu_end_ms, gpu_end_ms): the layer's expert phase
    load_done_ms: tuple[float, ...] = ()  # when each copy in `load` completes


ScheduleFn = Callable[[Mapping[int, int], AbstractSet[int], CostModel, float], LayerSchedule]

# Rank-form result: index tuples into [non-resident by (load, id)] + [resident by (-load, id)],
# then cpu_end_ms, gpu_end_ms, pcie_end_ms, finish_ms, load_done_ms.
_Ranked = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], float, float, float, float, tuple[float, ...]]

# Maps a list of expert ids to the tuple of the ids at fixed positions.
_Picker = Callable[[list[int]], tuple[int, ...]]
# A memoized schedule: pickers for gpu, load and cpu, then cpu_end_ms .. load_done_ms.
_Memoized = tuple[_Picker, _Picker, _Picker, tuple[float, float, float, float, tuple[float, ...]]]


def _split_sorted(
    n_tokens_of: Mapping[int, int], resident: AbstractSet[int]
) -> tuple[list[int], list[int], list[int], list[int], bool]:
    """-> (non-resident ids by (load, id), their loads, resident ids by (-load, id), their loads, decode)."""
    if sum(n_tokens_of.values()) == len(n_tokens_of):
        ids = n_tokens_of.keys()
        non, res = sorted(ids - resident), sorted(ids & resident)
        return non, [1] * len(non), res, [1] * len(res), True
    res = [e for e in n_tokens_of if e in resident]
    non = [e for e in n_tokens_of if e not in resident]
    non.sort(key=lambda e: (n_tokens_of[e], e))
    res.sort(key=lambda e: (-n_tokens_of[e], e))
    return non, [n_tokens_of[e] for e in non], res, [n_tokens_of[e] for e in res], False


def _from_ranked(ids: list[int], ranked: _Ranked) -> LayerSchedule:
    gpu_idx, load_idx, cpu_idx, *times = ranked
    return LayerSchedule(
        tuple([ids[i] for i in gpu_idx]), tuple([ids[i] for i in load_idx]), tuple([ids[i] for i in cpu_idx]), *times
    )


def _picker(positions: tuple[int, ...]) -> _Picker:
    """A C-level getter of ids[positions] as a tuple (itemgetter alone returns a bare item for one)."""
    if not positions:
        return _pick_none
    if len(positions) == 1:
        get_one = itemgetter(positions[0])
        return lambda ids: (get_one(ids),)
    return itemgetter(*positions)


def _pick_none(ids: list[int]) -> tuple[int, ...]:
    return ()


def _memoized(ranked: _Ranked) -> _Memoized:
    gpu_idx, load_idx, cpu_idx, *times = ranked
    return _picker(gpu_idx), _picker(load_idx), _picker(cpu_idx), tuple(times)


def _cpu_only_ranked(non_n: list[int], res_n: list[int], costs: CostModel, pcie0: float) -> _Ranked:
    cpu_ms = costs.cpu_ms
    n = len(non_n) + len(res_n)
    # Lowest load first: the non-resident queue ascending, then the resident queue from its back.
    order = tuple(range(len(non_n))) + tuple(range(n - 1, len(non_n) - 1, -1))
    cpu_end = (costs.cpu_first_extra_ms + sum(map(cpu_ms, non_n)) + sum(map(cpu_ms, res_n))) if n else 0.0
    return (), (), order, cpu_end, 0.0, pcie0, cpu_end, ()


def _hybrid_ranked(non_n: list[int], res_n: list[int], costs: CostModel, pcie0: float, guarded: bool) -> _Ranked:
    """The greedy on loads alone; non_n ascending, res_n descending (see the module docstring)."""
    if not costs.has_accelerator:
        return _cpu_only_ranked(non_n, res_n, costs, pcie0)
    load_ms, extra_ms = costs.load_ms, costs.cpu_first_extra_ms
    non_cpu = list(map(costs.cpu_ms, non_n))
    non_gpu = list(map(costs.gpu_ms, non_n))
    res_cpu = list(map(costs.cpu_ms, res_n))
    res_gpu = list(map(costs.gpu_ms, res_n))
    m = len(non_n)
    lo, hi = 0, m  # non-resident queue: non_n[lo:hi]
    rlo, rhi = 0, len(res_n)  # resident queue: res_n[rlo:rhi]
    queued_cpu_ms = sum(non_cpu)  # CPU cost of non_n[lo:hi]
    queued_non_gpu_ms = sum(non_gpu)  # GPU cost of non_n[lo:hi]
    queued_res_gpu_ms = sum(res_gpu)  # GPU cost of res_n[rlo:rhi]
    copies: list[float] = []  # arrival time of each copy, in issue order
    copied: list[int] = []  # index (into non_n) of each copy
    next_gpu_copy = 0  # copies[:next_gpu_copy] are already computed
    copies_gpu_ms = 0.0  # GPU cost of copies[next_gpu_copy:]
    gpu_idx: list[int] = []
    cpu_idx: list[int] = []
    cpu_t = gpu_t = gpu_end = 0.0
    pcie_t = pcie0
    pcie_on = m > 0  # False once the copy rule said no: no more copies this layer
    pcie_decides = True  # False once the CPU left every non-resident expert to the copy engine
    cpu_takes_non = cpu_steals = True
    first_ms = extra_ms  # the CPU's start-up cost, until it takes its first expert
    # Each pass places an expert, computes a copied one or turns a rule off: a bound no input exceeds.
    for _ in range(2 * m + len(res_n) + 4):
        # When each timeline can next act (inf: nothing to do, now or later).
        n_copies = len(copies)
        if rlo < rhi or (next_gpu_copy < n_copies and copies[next_gpu_copy] <= gpu_t):
            gpu_at = gpu_t
        elif next_gpu_copy < n_copies:
            gpu_at = copies[next_gpu_copy]
        else:
            gpu_at = _INF
        cpu_at = cpu_t if ((cpu_takes_non and lo < hi) or (cpu_steals and rlo < rhi)) else _INF
        pcie_at = pcie_t if (pcie_on and lo < hi) else _INF
        if pcie_at <= gpu_at and pcie_at <= cpu_at:
            if pcie_at == _INF:
                break
            x = hi - 1
            if pcie_decides:
                # Work ahead of x on the GPU: copies not yet computed, residents of load >= x's.
                n_x = non_n[x]
                if rlo == rhi or res_n[rhi - 1] >= n_x:
                    ahead_ms = copies_gpu_ms + queued_res_gpu_ms
                else:
                    ahead_ms = copies_gpu_ms
                    i = rlo
                    while res_n[i] >= n_x:
                        ahead_ms += res_gpu[i]
                        i += 1
                start_ms = pcie_t + load_ms
                ready_ms = (gpu_t if gpu_t > pcie_t else pcie_t) + ahead_ms
                gpu_done = (start_ms if start_ms > ready_ms else ready_ms) + non_gpu[x]
                if gpu_done >= cpu_t + queued_cpu_ms + first_ms:
                    pcie_on = False
                    continue
            hi = x
            queued_cpu_ms -= non_cpu[x]
            queued_non_gpu_ms -= non_gpu[x]
            copies_gpu_ms += non_gpu[x]
            pcie_t += load_ms
            copies.append(pcie_t)
            copied.append(x)
        elif gpu_at <= cpu_at:
            gpu_t = gpu_at
            if rlo < rhi and not (
                next_gpu_copy < n_copies
                and copies[next_gpu_copy] <= gpu_t
                and non_n[copied[next_gpu_copy]] > res_n[rlo]
            ):
                gpu_t += res_gpu[rlo]
                queued_res_gpu_ms -= res_gpu[rlo]
                gpu_idx.append(m + rlo)
                rlo += 1
            else:
                x = copied[next_gpu_copy]
                gpu_t += non_gpu[x]
                copies_gpu_ms -= non_gpu[x]
                next_gpu_copy += 1
            gpu_end = gpu_t
        else:
            if cpu_takes_non and lo < hi:
                if guarded and pcie_on and pcie_decides:
                    # Would copying lo after every other queued non-resident expert still beat the CPU?
                    arrival_ms = (pcie_t if pcie_t > cpu_t else cpu_t) + (hi - lo) * load_ms
                    ready_ms = (gpu_t if gpu_t > cpu_t else cpu_t) + copies_gpu_ms + queued_res_gpu_ms
                    ready_ms += queued_non_gpu_ms - non_gpu[lo]
                    start_ms = arrival_ms if arrival_ms > ready_ms else ready_ms
                    if start_ms + non_gpu[lo] < cpu_t + first_ms + non_cpu[lo]:
                        cpu_takes_non = False
                        pcie_decides = False
                        continue
                cpu_t += first_ms + non_cpu[lo]
                queued_cpu_ms -= non_cpu[lo]
                queued_non_gpu_ms -= non_gpu[lo]
                cpu_idx.append(lo)
                lo += 1
            else:
                r = rhi - 1
                if guarded:
                    # Steal the lowest-load resident expert only if the CPU finishes it first.
                    gpu_done = (gpu_t if gpu_t > cpu_t else cpu_t) + queued_res_gpu_ms
                    for i in range(next_gpu_copy, n_copies):
                        if non_n[copied[i]] > res_n[r]:
                            gpu_done += non_gpu[copied[i]]
                    if cpu_t + first_ms + res_cpu[r] >= gpu_done:
                        cpu_steals = False
                        continue
                rhi = r
                cpu_t += first_ms + res_cpu[r]
                queued_res_gpu_ms -= res_gpu[r]
                cpu_idx.append(m + r)
            first_ms = 0.0
    else:
        raise RuntimeError(f"the hybrid schedule did not finish (costs: CPU {non_cpu + res_cpu} ms, GPU "
                           f"{non_gpu + res_gpu} ms, load {load_ms} ms): a cost is not a finite number")
    return (
        tuple(gpu_idx),
        tuple(copied),
        tuple(cpu_idx),
        cpu_t,
        gpu_end,
        copies[-1] if copies else pcie0,
        cpu_t if cpu_t > gpu_end else gpu_end,
        tuple(copies),
    )


def schedule_hybrid(
    n_tokens_of: Mapping[int, int],
    resident: AbstractSet[int],
    costs: CostModel,
    pcie_free_at_ms: float = 0.0,
    guarded: bool = True,
) -> LayerSchedule:
    """HybriMoE's greedy with the CPU guards, or with guarded=False as the paper states it
    (memoized; see the module docstring)."""
    non, non_n, res, res_n, decode = _split_sorted(n_tokens_of, resident)
    if decode:  # the loads are all 1: only the counts matter
        key = (len(res), len(non), pcie_free_at_ms, guarded)
    else:
        key = (tuple(res_n), tuple(non_n), pcie_free_at_ms, guarded)
    memo = costs.schedule_memo
    entry = memo.get(key)
    if entry is None:
        if len(memo) >= _MEMO_MAX:
            memo.clear()
        entry = memo[key] = _memoized(_hybrid_ranked(non_n, res_n, costs, pcie_free_at_ms, guarded))
    ids = non + res
    pick_gpu, pick_load, pick_cpu, times = entry
    return LayerSchedule(pick_gpu(ids), pick_load(ids), pick_cpu(ids), *times)


def schedule_hybrid_paper(
    n_tokens_of: Mapping[int, int],
    resident: AbstractSet[int],
    costs: CostModel,
    pcie_free_at_ms: float = 0.0,
) -> LayerSchedule:
    """HybriMoE's greedy as the paper states it: the CPU always takes its next expert (memoized)."""
    return schedule_hybrid(n_tokens_of, resident, costs, pcie_free_at_ms, guarded=False)


def schedule_hybrid_unmemoized(
    n_tokens_of: Mapping[int, int],
    resident: AbstractSet[int],
    costs: CostModel,
    pcie_free_at_ms: float = 0.0,
    guarded: bool = True,
) -> LayerSchedule:
    """`schedule_hybrid` (or, with guarded=False, `schedule_hybrid_paper`) without the memo."""
    non, non_n, res, res_n, _ = _split_sorted(n_tokens_of, resident)
    return _from_ranked(non + res, _hybrid_ranked(non_n, res_n, costs, pcie_free_at_ms, guarded))


def _gpu_end_ms(resident_ms: float, copy_gpu_ms: list[float], pcie0: float, load_ms: float) -> float:
    """GPU end when resident work starts at 0 and copies arrive back to back from pcie0."""
    t = resident_ms
    arrival = pcie0
    for p in copy_gpu_ms:
        arrival += load_ms
        t = max(t, arrival) + p
    return t


def schedule_cpu_only(
    n_tokens_of: Mapping[int, int],
    resident: AbstractSet[int],
    costs: CostModel,
    pcie_free_at_ms: float = 0.0,
) -> LayerSchedule:
    """Every expert on the CPU, lowest load first."""
    non, non_n, res, res_n, _ = _split_sorted(n_tokens_of, resident)
    return _from_ranked(non + res, _cpu_only_ranked(non_n, res_n, costs, pcie_free_at_ms))


def schedule_static(
    n_tokens_of: Mapping[int, int],
    resident: AbstractSet[int],
    costs: CostModel,
    pcie_free_at_ms: float = 0.0,
) -> LayerSchedule:
    """Resident experts on the GPU (highest load first), the rest on the CPU (lowest first), no copies."""
    if not costs.has_accelerator:
        return schedule_cpu_only(n_tokens_of, resident, costs, pcie_free_at_ms)
    non, non_n, res, res_n, _ = _split_sorted(n_tokens_of, resident)
    cpu_ms = costs.cpu_ms
    cpu_end = (costs.cpu_first_extra_ms + sum(map(cpu_ms, non_n))) if non else 0.0
    gpu_end = float(sum(map(costs.gpu_ms, res_n)))
    return LayerSchedule(
        tuple(res), (), tuple(non), cpu_end, gpu_end, pcie_free_at_ms, max(cpu_end, gpu_end), ()
    )


def schedule_gpu_only(
    n_tokens_of: Mapping[int, int],
    resident: AbstractSet[int],
    costs: CostModel,
    pcie_free_at_ms: float = 0.0,
) -> LayerSchedule:
    """Resident experts on the GPU; every other one copied on demand (highest load first), then run there."""
    if not costs.has_accelerator:
        return schedule_cpu_only(n_tokens_of, resident, costs, pcie_free_at_ms)
    non, non_n, res, res_n, _ = _split_sorted(n_tokens_of, resident)
    gpu_ms, load_ms = costs.gpu_ms, costs.load_ms
    load = non[::-1]
    load_done = tuple(pcie_free_at_ms + load_ms * (i + 1) for i in range(len(load)))
    gpu_end = _gpu_end_ms(float(sum(map(gpu_ms, res_n))), [gpu_ms(n) for n in non_n[::-1]], pcie_free_at_ms, load_ms)
    pcie_end = load_done[-1] if load_done else pcie_free_at_ms
    return LayerSchedule(tuple(res), tuple(load), (), 0.0, gpu_end, pcie_end, gpu_end, load_done)


def schedule_exact(
    n_tokens_of: Mapping[int, int],
    resident: AbstractSet[int],
    costs: CostModel,
    pcie_free_at_ms: float = 0.0,
) -> LayerSchedule:
    """The best split under the greedy's timing model, by enumerating 2^n splits (n <= EXACT_MAX_EXPERTS).

    Among equally fast splits, the first found wins; splits are enumerated with fewer experts on
    the GPU side first, so copies are not made for nothing.
    """
    n = len(n_tokens_of)
    if n > EXACT_MAX_EXPERTS:
        raise ValueError(f"schedule_exact handles at most {EXACT_MAX_EXPERTS} experts, got {n}")
    if not costs.has_accelerator:
        return schedule_cpu_only(n_tokens_of, resident, costs, pcie_free_at_ms)
    non, non_n, res, res_n, _ = _split_sorted(n_tokens_of, resident)
    cpu_ms, gpu_ms, load_ms, extra_ms = costs.cpu_ms, costs.gpu_ms, costs.load_ms, costs.cpu_first_extra_ms
    # Side 1 = GPU (resident) or copy + GPU (non-resident). Copies go in decreasing gpu_ms order.
    experts = [(e, n_tokens_of[e], e in resident) for e in non + res]
    experts.sort(key=lambda item: (-gpu_ms(item[1]), -item[1], item[0]))
    best = None
    for mask in sorted(range(1 << n), key=lambda m: (m.bit_count(), m)):
        cpu_side = [x for i, x in enumerate(experts) if not mask >> i & 1]
        gpu_side = [x for i, x in enumerate(experts) if mask >> i & 1]
        cpu_end = (extra_ms + sum(cpu_ms(x[1]) for x in cpu_side)) if cpu_side else 0.0
        resident_ms = float(sum(gpu_ms(x[1]) for x in gpu_side if x[2]))
        copy_ms = [gpu_ms(x[1]) for x in gpu_side if not x[2]]
        gpu_end = _gpu_end_ms(resident_ms, copy_ms, pcie_free_at_ms, load_ms)
        finish = max(cpu_end, gpu_end)
        if best is None or finish < best[0]:
            best = (finish, cpu_end, gpu_end, cpu_side, gpu_side)
    finish, cpu_end, gpu_end, cpu_side, gpu_side = best
    cpu = sorted(cpu_side, key=lambda x: (x[1], x[0]))
    load = [x[0] for x in gpu_side if not x[2]]
    load_done = tuple(pcie_free_at_ms + load_ms * (i + 1) for i in range(len(load)))
    return LayerSchedule(
        tuple(x[0] for x in sorted((x for x in gpu_side if x[2]), key=lambda x: (-x[1], x[0]))),
        tuple(load),
        tuple(x[0] for x in cpu),
        cpu_end,
        gpu_end,
        load_done[-1] if load_done else pcie_free_at_ms,
        finish,
        load_done,
    )
