"""Autotuning: Optuna searches the policy section of a profile on simulated replays of real routing.

Modules: `space` (the knobs and their ranges, in one function), `workload` (the replayed traces
and the objective), `setup` (every input checked before the first trial; the budget; the study's
identity), `study` (storage, sampler, pruner, objective, worker processes), `result` (the report's
contents and the tuned profile), `tuner` (the one call the CLI makes).
"""
