"""The fewest misses any cache of a given capacity and layout can have on a known access sequence.

Belady's MIN with bypass (a miss need not be admitted) on the flattened sequence, which is optimal
for each pool; a bound for the simulator's tables, never used by the runtime.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence

from hybrimoe.policy.names import LAYOUTS, check_name, even_pool_sizes

def belady_misses(
    accesses: Sequence[tuple[int, Iterable[int]]],  # (layer, experts used) per layer call, in order
    capacity: int,
    layout: str,
    n_layers: int,
    n_experts: int,
) -> int:
    """The fewest misses any cache of this capacity and layout can have (MIN with bypass)."""
    check_name("cache layout", layout, LAYOUTS)
    keys = [layer * n_experts + int(e) for layer, experts in accesses for e in experts]
    next_use = [0] * len(keys)
    upcoming: dict[int, int] = {}
    never = len(keys)
    for i in range(len(keys) - 1, -1, -1):
        next_use[i] = upcoming.get(keys[i], never)
        upcoming[keys[i]] = i
    if layout == "shared":
        sizes = [capacity]
        pool_of = [0] * n_layers
    else:
        sizes = even_pool_sizes(capacity, n_layers)
        pool_of = list(range(n_layers))
    resident: list[dict[int, int]] = [{} for _ in sizes]  # key -> its next use
    heaps: list[list[tuple[int, int]]] = [[] for _ in sizes]  # (-next use, key), stale entries skipped
    misses = 0
    for i, key in enumerate(keys):
        pool = pool_of[key // n_experts]
        res, heap = resident[pool], heaps[pool]
        nxt = next_use[i]
        if key in res:
            res[key] = nxt
            heapq.heappush(heap, (-nxt, key))
            continue
        misses += 1
        if sizes[pool] == 0:
            continue
        if len(res) >= sizes[pool]:
            while res.get(heap[0][1]) != -heap[0][0]:
                heapq.heappop(heap)
            if -heap[0][0] <= nxt:
                continue  # the newcomer is needed last: bypass
            del res[heapq.heappop(heap)[1]]
        res[key] = nxt
        heapq.heappush(heap, (-nxt, key))
    return misses
