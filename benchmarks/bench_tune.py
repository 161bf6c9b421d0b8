"""How good and how fast is `hybrimoe tune`? Tuned against the default policy and an exhaustive grid.

On the shipped Qwen3-30B-A3B trace with the RTX 4090 profile, the cache fixed at a quarter of the
experts, decode objective:
1. `tune` with its default trial budget: the tuned config's decode ms/token against the default
   policy's (both from the same study), on the training replay and the holdout;
2. every configuration of the same discretised space (`SearchSpace.grid`), simulated on the same
   training replay: the tuned config against the grid's best, both on the holdout too;
3. the wall time of `hybrimoe tune`'s defaults (weighted objective, the whole training replay,
   100 trials, one worker) on this machine, with how many trials were pruned.

Run: python benchmarks/bench_tune.py [--max-tokens 600] [--workers 2]
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import time
from pathlib import Path

from hybrimoe.tune.result import summarize
from hybrimoe.tune.setup import TuneOptions, load_inputs
from hybrimoe.tune.study import run_study

REPO = Path(__file__).resolve().parents[1]
TRACE = REPO / "traces" / "qwen3-30b-a3b.npz"
PROFILE = REPO / "profiles" / "rtx4090-desktop.qwen3-30b-a3b.yaml"

_inputs = None  # per grid worker process


def options(out: Path, **overrides) -> TuneOptions:
    return TuneOptions(traces=(TRACE,), out=out, profile=PROFILE, storage="memory", cache_ratio=0.25, **overrides)


def _init(opts: TuneOptions) -> None:
    global _inputs
    _inputs = load_inputs(opts)


def _grid_point(chosen: dict) -> tuple[dict, float]:
    space, workload = _inputs.space, _inputs.workload
    result = workload.evaluate(workload.train, _inputs.profile, "hybrimoe", space.policy_of(chosen), space.slots_of(chosen))
    return chosen, result.objective_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=600, help="replayed tokens of the training part")
    parser.add_argument("--workers", type=int, default=2, help="processes for the grid")
    parser.add_argument("--trials", type=int, default=TuneOptions.trials)
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="bench-tune-")) / "tuned.yaml"

    decode = options(out, objective="decode", max_tokens=args.max_tokens, trials=args.trials)
    inputs = load_inputs(decode)
    started = time.perf_counter()
    study = run_study(inputs)
    tune_s = time.perf_counter() - started
    result = summarize(inputs, study, tune_s)
    tuned, default = result.tuned, result.row("default")
    print(f"decode, {args.max_tokens} replayed tokens, {inputs.budget}; holdout: {inputs.holdout}")
    print(f"tune: {result.trials} trials ({result.pruned} pruned) in {tune_s:.0f} s")
    for name, row in (("tuned", tuned), ("default", default)):
        print(f"  {name:8s} train {row.train.decode_ms_per_token:.3f} ms/token, "
              f"holdout {row.holdout.decode_ms_per_token:.3f} ms/token  ({row.policy})")
    print(f"  tuned/default: train {tuned.train.objective_ms / default.train.objective_ms:.3f}, "
          f"holdout {tuned.holdout.objective_ms / default.holdout.objective_ms:.3f}")

    points = list(inputs.space.grid())
    started = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(args.workers, initializer=_init, initargs=(decode,)) as pool:
        grid = pool.map(_grid_point, points, chunksize=4)
    grid_s = time.perf_counter() - started
    best_choice, best_ms = min(grid, key=lambda point: point[1])
    best_policy = inputs.space.policy_of(best_choice)
    held = inputs.workload.evaluate(inputs.workload.holdout, inputs.profile, "hybrimoe", best_policy,
                                    inputs.space.slots_of(best_choice))
    print(f"grid: {len(points)} configurations in {grid_s:.0f} s ({args.workers} processes)")
    print(f"  grid best train {best_ms:.3f} ms/token, holdout {held.decode_ms_per_token:.3f} ms/token  ({best_policy})")
    print(f"  tuned/grid best: train {tuned.train.objective_ms / best_ms:.3f}, "
          f"holdout {tuned.holdout.objective_ms / held.objective_ms:.3f}")
    better = sum(ms < tuned.train.objective_ms * (1 - 1e-9) for _, ms in grid)
    print(f"  {better} of {len(points)} grid configurations beat the tuned one on train")

    defaults = options(out.with_name("defaults.yaml"))
    inputs = load_inputs(defaults)
    started = time.perf_counter()
    study = run_study(inputs)
    wall_s = time.perf_counter() - started
    result = summarize(inputs, study, wall_s)
    ratio = result.tuned.train.objective_ms / result.row("default").train.objective_ms
    print(f"tune's defaults (weighted, whole training replay, {result.trials} trials, 1 worker): {wall_s:.0f} s, "
          f"{result.pruned} pruned; tuned/default {ratio:.3f} on train, "
          f"{result.tuned.holdout.objective_ms / result.row('default').holdout.objective_ms:.3f} on holdout")


if __name__ == "__main__":
    main()
