"""The policy core: every placement decision, as plain Python with no torch import.

Modules: `costs` (cost model from a hardware profile), `plan` (the per-layer plan the runtime
executes), `cache` (GPU expert caches), `scheduler` (intra-layer CPU/GPU/PCIe split), `prefetch`
(what to load ahead for later layers), `strategies` (complete planners: hybrimoe and the baselines),
`simulator` (replays a routing trace through a planner on a cost model).
"""
