"""The policy core's names and shared rules (decode steps, per-layer pool sizes), each in one place.

Every name a profile, a flag or a caller may give (strategy, cache policy, cache layout, prefetch
kind, predictor) is one tuple here; `check_name` refuses anything else with one message naming
the setting and the choices (`PolicyError`: the CLI prints it as one line).
"""

from __future__ import annotations

from collections.abc import Mapping

from hybrimoe.errors import PolicyError

STRATEGIES = (
    "hybrimoe", "ktransformers", "ktransformers-dynamic", "ktransformers-front", "static-oracle", "llamacpp",
    "llamacpp-lru", "gpu-offload", "cpu-only",
)
# Strategies a user could deploy today: the comparison's "best baseline" is the fastest of these.
# (static-oracle places by the replayed tokens' own frequencies, which no deployment knows.)
BASELINES = ("ktransformers", "ktransformers-dynamic", "ktransformers-front", "llamacpp", "llamacpp-lru",
             "gpu-offload", "cpu-only")
# Strategies whose placement is counted on a profiling workload (ktransformers-dynamic starts from
# kTransformers' default uniform placement without one).
NEEDS_FREQUENCIES = ("ktransformers", "static-oracle")
# Reference rows of a comparison, not strategies: Belady's cache with perfect prediction
# (`comparison.belady_oracle_planner`), and a lower bound on any strategy's time (`bound.py`).
BELADY_ORACLE, LOWER_BOUND = "belady-oracle", "lower-bound"

CONFIGURABLE_POLICIES = ("mrs", "lru", "lfu", "least-stale", "static")  # what a profile's policy may name
ADMITTING_POLICIES = tuple(p for p in CONFIGURABLE_POLICIES if p != "static")  # the ones that take loads
CACHE_POLICIES = (*CONFIGURABLE_POLICIES, "belady")  # belady needs the future: simulation only
LAYOUTS = ("shared", "per-layer")
PREFETCHES = ("impact", "top-score", "none")
PREDICTORS = ("recorded", "recent", "oracle")  # where the simulator's lookahead comes from
MODES = ("decode", "prefill")  # how the simulator replays a trace's steps

MEMO_MAX = 1 << 16  # entries of any memo in the policy core before it is cleared


def check_name(setting: str, value: str, choices: tuple[str, ...]) -> str:
    """`value` when it is one of `choices`; else PolicyError naming the setting and the choices."""
    if value not in choices:
        raise PolicyError(f"unknown {setting} {value!r}; expected one of {', '.join(choices)}")
    return value


def is_decode(counts: Mapping[int, int]) -> bool:
    """Whether every expert of a layer has one token (a decode step of one sequence): then only how
    many experts there are, and which are resident, matters to a schedule."""
    return len(counts) == sum(counts.values())


def even_pool_sizes(capacity: int, n_layers: int) -> list[int]:
    """[L] a per-layer split of `capacity` slots: even, the first `capacity % n_layers` layers one more."""
    share, extra = divmod(capacity, n_layers)
    return [share + (1 if layer < extra else 0) for layer in range(n_layers)]
