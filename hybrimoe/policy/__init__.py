"""The policy core: every placement decision, as plain Python with no torch import.

The three decisions, one module each: the layer's CPU/GPU/copy split (`scheduler`, HybriMoE's
greedy in `greedy`), which resident expert to evict (`cache`, ranked by `cache_policies`), what to
prefetch (`prefetch`). `planner` composes them for every layer and keeps the modelled clock
(`timeline`); `strategies` configures a planner as hybrimoe or a baseline (`baselines`). Around
them: `names` (every name and shared rule), `costs` (the cost model from a hardware profile),
`plan` (the per-layer plan the runtime executes), `counters` (what the planner and the run count),
`simulator` (replays a routing trace through a planner), `comparison` (every strategy at every
cache size, `hybrimoe simulate`'s tables), `bound` (a time no strategy beats), `card` (which
cache sizes fit the profile's accelerator), `belady` (the fewest misses any cache can have).
"""
