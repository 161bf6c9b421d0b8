"""Intra-layer scheduling: which activated experts run on the GPU, which are copied in, which run on the CPU.

Every function here has the same signature (`ScheduleFn`) and returns a `LayerSchedule`; times are
ms from the start of the layer's expert phase.

Design choices:
- `schedule_hybrid` is HybriMoE's greedy list scheduler (`greedy.py`: its three timelines, the
  transfer rule and the CPU guards, stepped as the paper describes them).
- Memoization: the greedy's decisions depend on the experts only through their loads and through
  the rank of each expert in its sorted queue, so a result is computed once per (resident loads
  sorted, non-resident loads sorted, pcie_free_at_ms) and stored as indices into the
  concatenation [non-resident experts by (load, id)] + [resident experts by (-load, id)]; a call
  sorts its experts the same way and maps the indices back to ids. Decode (every count 1) keys on
  just (resident count, non-resident count, pcie_free_at_ms). The memo is the scheduler's own, one
  per cost model (`_MEMOS`, held weakly: it goes with its cost model), so do not change a cost
  model's fields after its first use; make a new one, as `CostModel.without_loads` does. It is
  cleared when it reaches `MEMO_MAX` entries.
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

import weakref
from collections.abc import Callable, Mapping
from collections.abc import Set as AbstractSet
from operator import itemgetter
from typing import NamedTuple

from hybrimoe.policy.costs import CostModel
from hybrimoe.policy.greedy import Greedy, Ranked
from hybrimoe.policy.names import MEMO_MAX, is_decode

EXACT_MAX_EXPERTS = 12
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


# The memo of `schedule_hybrid`, per cost model: key -> `_Memoized`.
_MEMOS: weakref.WeakKeyDictionary[CostModel, dict] = weakref.WeakKeyDictionary()

ScheduleFn = Callable[[Mapping[int, int], AbstractSet[int], CostModel, float], LayerSchedule]

# Maps a list of expert ids to the tuple of the ids at fixed positions.
_Picker = Callable[[list[int]], tuple[int, ...]]
# A memoized schedule: pickers for gpu, load and cpu, then cpu_end_ms .. load_done_ms.
_Memoized = tuple[_Picker, _Picker, _Picker, tuple[float, float, float, float, tuple[float, ...]]]


def _split_sorted(
    n_tokens_of: Mapping[int, int], resident: AbstractSet[int]
) -> tuple[list[int], list[int], list[int], list[int], bool]:
    """-> (non-resident ids by (load, id), their loads, resident ids by (-load, id), their loads, decode)."""
    if is_decode(n_tokens_of):
        ids = n_tokens_of.keys()
        non, res = sorted(ids - resident), sorted(ids & resident)
        return non, [1] * len(non), res, [1] * len(res), True
    res = [e for e in n_tokens_of if e in resident]
    non = [e for e in n_tokens_of if e not in resident]
    non.sort(key=lambda e: (n_tokens_of[e], e))
    res.sort(key=lambda e: (-n_tokens_of[e], e))
    return non, [n_tokens_of[e] for e in non], res, [n_tokens_of[e] for e in res], False


def _from_ranked(ids: list[int], ranked: Ranked) -> LayerSchedule:
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


def _memoized(ranked: Ranked) -> _Memoized:
    gpu_idx, load_idx, cpu_idx, *times = ranked
    return _picker(gpu_idx), _picker(load_idx), _picker(cpu_idx), tuple(times)


def _cpu_only_ranked(non_n: list[int], res_n: list[int], costs: CostModel, pcie0: float) -> Ranked:
    cpu_ms = costs.cpu_ms
    n = len(non_n) + len(res_n)
    # Lowest load first: the non-resident queue ascending, then the resident queue from its back.
    order = tuple(range(len(non_n))) + tuple(range(n - 1, len(non_n) - 1, -1))
    cpu_end = (costs.cpu_first_extra_ms + sum(map(cpu_ms, non_n)) + sum(map(cpu_ms, res_n))) if n else 0.0
    return (), (), order, cpu_end, 0.0, pcie0, cpu_end, ()


def _hybrid_ranked(non_loads: list[int], res_loads: list[int], costs: CostModel, pcie_free_ms: float,
                   guarded: bool) -> Ranked:
    """The greedy on loads alone; non_loads ascending, res_loads descending."""
    if not costs.has_accelerator:
        return _cpu_only_ranked(non_loads, res_loads, costs, pcie_free_ms)
    return Greedy(non_loads, res_loads, costs, pcie_free_ms, guarded).run()


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
    memo = _MEMOS.get(costs)
    if memo is None:
        memo = _MEMOS[costs] = {}
    entry = memo.get(key)
    if entry is None:
        if len(memo) >= MEMO_MAX:
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
