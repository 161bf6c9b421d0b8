"""The tuner's search space: which knobs of a profile's policy section it chooses, over which values.

Design choices:
- `policy_space` is the only place that knows the ranges. `suggest` walks the space with an Optuna
  trial, `grid` enumerates it (the benchmark's exhaustive reference), and `policy_of` turns chosen
  values into the `PolicyConfig` a tuned profile carries; none of them knows a range.
- Every knob is discrete, so the space the sampler explores and the grid are the same space.
  Integer knobs on an even step are ordinal for the sampler (`suggest_int`); the others are
  categorical.
- Conditional knobs: the MRS score decay and top-p exist only when the cache policy is MRS, the
  prefetch depth only for impact prefetch (top-score prefetch copies the next layer's experts,
  within the copy time idle before it, whatever its depth: a depth knob would repeat its trials). A trial suggests only the knobs its
  earlier choices enable, which Optuna's TPE handles with `group=True`.
- The cache capacity is a knob only when the budget is a memory size: its values run from the
  largest capacity the budget holds downwards, so no value over the budget is ever suggested. A
  fixed `--cache-experts`/`--cache-ratio` fixes it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from hybrimoe.config import PolicyConfig
from hybrimoe.policy.names import CONFIGURABLE_POLICIES, LAYOUTS, PREFETCHES

SLOT_STEPS = 16  # capacities tried between no cache and the budget's largest


@dataclass(frozen=True, slots=True)
class Knob:
    """One choice the tuner makes; it exists only when knob `when[0]` took one of `when[1]`."""

    name: str
    values: tuple[Any, ...]  # in order
    when: tuple[str, tuple[Any, ...]] | None = None

    def applies(self, chosen: Mapping[str, Any]) -> bool:
        return self.when is None or chosen.get(self.when[0]) in self.when[1]

    @property
    def _step(self) -> int | None:
        """The even step of an integer knob (ordinal for the sampler), else None."""
        values = self.values
        if len(values) < 2 or not all(type(v) is int for v in values):
            return None
        step = values[1] - values[0]
        evenly = all(b - a == step for a, b in zip(values, values[1:]))
        return step if evenly and step > 0 else None

    def suggest(self, trial) -> Any:
        step = self._step
        if step is not None:
            return trial.suggest_int(self.name, self.values[0], self.values[-1], step=step)
        return trial.suggest_categorical(self.name, self.values)


@dataclass(frozen=True)
class SearchSpace:
    knobs: tuple[Knob, ...]
    fixed_slots: int | None  # the cache capacity when it is not a knob
    total_experts: int  # routed experts over all MoE layers

    def suggest(self, trial) -> dict[str, Any]:
        """The trial's choices, one knob after another (conditional knobs only when enabled)."""
        chosen: dict[str, Any] = {}
        for knob in self.knobs:
            if knob.applies(chosen):
                chosen[knob.name] = knob.suggest(trial)
        return chosen

    def grid(self) -> Iterator[dict[str, Any]]:
        """Every distinct choice of the space (conditional knobs only where enabled)."""

        def expand(i: int, chosen: dict[str, Any]) -> Iterator[dict[str, Any]]:
            if i == len(self.knobs):
                yield dict(chosen)
                return
            knob = self.knobs[i]
            if not knob.applies(chosen):
                yield from expand(i + 1, chosen)
                return
            for value in knob.values:
                chosen[knob.name] = value
                yield from expand(i + 1, chosen)
                del chosen[knob.name]

        return expand(0, {})

    def slots_of(self, chosen: Mapping[str, Any]) -> int:
        return chosen["cache_slots"] if self.fixed_slots is None else self.fixed_slots

    def policy_of(self, chosen: Mapping[str, Any]) -> PolicyConfig:
        """The policy section for these choices; the capacity is written as a ratio, as `run` reads it."""
        prefetch = chosen["prefetch"]
        # top-score copies the next layer's experts whatever the depth; "none" copies nothing
        depth = chosen["prefetch_depth"] if prefetch == "impact" else int(prefetch == "top-score")
        mrs = chosen["cache_policy"] == "mrs"
        return PolicyConfig(
            cache_ratio=self.slots_of(chosen) / self.total_experts,
            cache_layout=chosen["cache_layout"],
            cache_policy=chosen["cache_policy"],
            mrs_alpha=chosen["mrs_alpha"] if mrs else PolicyConfig.mrs_alpha,
            mrs_top_p=chosen["mrs_top_p"] if mrs else None,
            prefetch=prefetch,
            prefetch_depth=depth,
            warm_start=chosen["warm_start"],
        )

    def choices_of(self, policy: PolicyConfig, top_k: int) -> dict[str, Any]:
        """The choices closest to `policy` (to enqueue the default); its capacity snaps to the grid."""
        chosen: dict[str, Any] = {}
        for knob in self.knobs:
            if not knob.applies(chosen):
                continue
            if knob.name == "cache_slots":
                wanted = round(policy.cache_ratio * self.total_experts)
                value = min(knob.values, key=lambda slots: abs(slots - wanted))
            elif knob.name == "mrs_top_p":
                value = policy.mrs_top_p or 2 * top_k
            elif knob.name == "prefetch":
                value = "none" if policy.prefetch_depth == 0 else policy.prefetch
            else:
                value = getattr(policy, knob.name)
            if value not in knob.values:
                raise ValueError(f"{knob.name}={value!r} is outside the search space")
            chosen[knob.name] = value
        return chosen


def policy_space(total_experts: int, top_k: int, max_slots: int, fixed_slots: int | None) -> SearchSpace:
    """The knobs `hybrimoe tune` searches: every range it uses is written here.

    `max_slots` is the most expert slots the budget holds; `fixed_slots` a capacity the user fixed.
    """
    knobs = []
    if fixed_slots is None:
        step = max(1, -(-max_slots // SLOT_STEPS))
        knobs.append(Knob("cache_slots", tuple(range(max_slots % step, max_slots + 1, step))))
    knobs += [
        Knob("cache_layout", LAYOUTS),
        Knob("cache_policy", CONFIGURABLE_POLICIES),
        Knob("mrs_alpha", (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0), when=("cache_policy", ("mrs",))),
        Knob("mrs_top_p", (top_k, 2 * top_k, 4 * top_k), when=("cache_policy", ("mrs",))),
        Knob("prefetch", PREFETCHES),
        Knob("prefetch_depth", (1, 2, 3, 4), when=("prefetch", ("impact",))),
        Knob("warm_start", (True, False)),
    ]
    return SearchSpace(tuple(knobs), fixed_slots, total_experts)
