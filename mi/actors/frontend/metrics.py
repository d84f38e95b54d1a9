"""`GET /metrics`: Prometheus metrics of the frontend and, at scrape time, of the backend.

Frontend-side (measured here, per app, in a private registry): HTTP requests by endpoint and
status, prompt and generated tokens, time to first token, inter-token latency and end-to-end
latency. Backend-side: the `/v1/stats` snapshot fetched just before each scrape (running and
waiting requests, KV blocks and their usage, prefix-cache hit rate, preemptions, finished
requests); when the backend cannot be asked, those series are left out and `mi_backend_up` is 0.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from mi.api.backend import BackendStats

__all__ = ["CONTENT_TYPE", "FrontendMetrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_TOKEN_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
)


class _BackendCollector:
    """Exposes the last `/v1/stats` snapshot (None: the backend did not answer)."""

    def __init__(self) -> None:
        self.stats: BackendStats | None = None

    def describe(self):
        return []  # unchecked collector: series depend on the snapshot

    def collect(self):
        stats = self.stats
        up = GaugeMetricFamily("mi_backend_up", "1 when the backend answered /v1/stats")
        up.add_metric([], 0 if stats is None else 1)
        yield up
        if stats is None:
            return
        gauges = {
            "mi_num_requests_running": ("Requests in the running batch", stats.num_requests_running),
            "mi_num_requests_waiting": ("Requests waiting to be scheduled", stats.num_requests_waiting),
            "mi_num_kv_blocks": ("KV-cache blocks in total", stats.num_kv_blocks),
            "mi_num_kv_blocks_used": ("KV-cache blocks in use", stats.num_kv_blocks_used),
            "mi_kv_cache_usage_ratio": (
                "Fraction of KV-cache blocks in use",
                stats.num_kv_blocks_used / stats.num_kv_blocks if stats.num_kv_blocks else 0.0,
            ),
            "mi_prefix_cache_hit_rate": (
                "Prompt tokens served from the prefix cache / prompt tokens looked up",
                stats.prefix_cache_hit_tokens / stats.prefix_cache_queried_tokens
                if stats.prefix_cache_queried_tokens
                else 0.0,
            ),
        }
        for name, (doc, value) in gauges.items():
            gauge = GaugeMetricFamily(name, doc)
            gauge.add_metric([], value)
            yield gauge
        counters = {
            "mi_num_preemptions": ("Requests preempted (recomputed later)", stats.num_preemptions),
            "mi_prefix_cache_queried_tokens": (
                "Prompt tokens looked up in the prefix cache",
                stats.prefix_cache_queried_tokens,
            ),
            "mi_prefix_cache_hit_tokens": (
                "Prompt tokens found in the prefix cache",
                stats.prefix_cache_hit_tokens,
            ),
            "mi_backend_prompt_tokens": ("Prompt tokens the backend processed", stats.prompt_tokens_total),
            "mi_backend_generation_tokens": ("Tokens the backend generated", stats.generation_tokens_total),
            "mi_backend_replica_restarts": (
                "Replicas the backend replaced after a failure (--on-failure restart)",
                stats.replica_restarts_total,
            ),
        }
        for name, (doc, value) in counters.items():
            counter = CounterMetricFamily(name, doc)
            counter.add_metric([], value)
            yield counter
        finished = CounterMetricFamily(
            "mi_backend_requests_finished", "Requests the backend finished", labels=["finished_reason"]
        )
        for reason, count in sorted(stats.requests_finished_total.items()):
            finished.add_metric([reason], count)
        yield finished


class FrontendMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.requests = Counter(
            "mi_http_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.prompt_tokens = Counter("mi_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter(
            "mi_generation_tokens", "Tokens generated for finished requests", registry=r
        )
        self.ttft = Histogram(
            "mi_time_to_first_token_seconds",
            "Time to the first generated token (streamed requests)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token = Histogram(
            "mi_inter_token_latency_seconds",
            "Time between generated tokens (streamed requests)",
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "mi_e2e_request_latency_seconds",
            "Time from request to its last token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self._backend = _BackendCollector()
        r.register(self._backend)

    def observe_request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()

    def observe_finished(self, prompt_tokens: int, completion_tokens: int, seconds: float) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)
        self.e2e.observe(seconds)

    def observe_tokens(self, num_tokens: int, seconds_since_last: float) -> None:
        """`num_tokens` arrived together `seconds_since_last` after the previous ones."""
        per_token = seconds_since_last / num_tokens
        for _ in range(num_tokens):
            self.inter_token.observe(per_token)

    def render(self, stats: BackendStats | None) -> bytes:
        self._backend.stats = stats
        return generate_latest(self.registry)
