"""The server's Prometheus metrics, in one registry per server (tests start several).

Counters and histograms are updated as requests come and go; the engine's and the runtime's
state (queue depth, active sequences, cache hits, bytes copied, planning time) is read when
/metrics is scraped, so nothing is copied on the step's path.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

_TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("hybrimoe_requests", "HTTP requests by endpoint and status.", ["endpoint", "status"],
                                registry=r)
        self.ttft = Histogram("hybrimoe_time_to_first_token_seconds", "From a request's arrival to its first token.",
                              buckets=_TTFT_BUCKETS_S, registry=r)

    def watch(self, engine) -> None:
        """Adds the engine's state, read at each scrape."""
        self.registry.register(_EngineCollector(engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector(Collector):
    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        engine, stats = self.engine, self.engine.stats
        yield GaugeMetricFamily("hybrimoe_queue_depth", "Requests waiting to join the batch.", engine.n_waiting)
        yield GaugeMetricFamily("hybrimoe_active_sequences", "Requests in the running batch.", engine.n_active)
        yield GaugeMetricFamily("hybrimoe_tokens_per_second", "Tokens generated per second over the last 10 s.",
                                stats.tokens_per_s())
        yield CounterMetricFamily("hybrimoe_prompt_tokens", "Prompt tokens prefilled.", stats.n_prompt_tokens)
        yield CounterMetricFamily("hybrimoe_generated_tokens", "Tokens generated.", stats.n_completion_tokens)
        yield CounterMetricFamily("hybrimoe_steps", "Forward steps run.", stats.n_steps)
        finished = CounterMetricFamily("hybrimoe_finished_requests", "Requests ended, by reason.", labels=["reason"])
        for reason in ("stop", "length", "cancelled", "error"):
            finished.add_metric([reason], stats.n_finished[reason])
        yield finished
        runtime = engine.runtime
        if runtime is None:
            return
        c = runtime.counters
        yield GaugeMetricFamily("hybrimoe_expert_cache_hit_rate", "Activated experts found on the accelerator.",
                                c.hit_rate or 0.0)
        yield CounterMetricFamily("hybrimoe_expert_bytes_copied", "Expert bytes copied to the accelerator.",
                                  c.bytes_loaded)
        yield CounterMetricFamily("hybrimoe_planner_seconds", "Time the planner took, placing and prefetching.",
                                  (c.planning_ns + c.prefetch_planning_ns) / 1e9)
