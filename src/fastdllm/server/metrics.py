"""`GET /metrics`: what operators scrape, in the Prometheus text format (prometheus_client).

Gauges and counters are read from the scheduler and the engine's KV pool at scrape time (a
collector, so the decode loop never pays for them); the two latency histograms are observed by
the request handlers. Each server has its own registry, so several servers in one process
(tests) never share series.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# seconds; time to first token spans a cached prefix on a GPU (ms) to a long CPU prefill (s)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, scheduler):
        self.registry = CollectorRegistry()
        self.registry.register(_Collector(scheduler))
        self.ttft = Histogram("fastdllm_time_to_first_token_seconds",
                              "Seconds from a request's arrival to its first generated text",
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.latency = Histogram("fastdllm_e2e_request_latency_seconds",
                                 "Seconds from a request's arrival to its last token",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Collector:
    def __init__(self, scheduler):
        self.scheduler = scheduler

    def collect(self):
        s = self.scheduler
        h = s.health()
        kv = h["kv_cache"]
        yield GaugeMetricFamily("fastdllm_requests_running", "Requests holding KV pages and decoding",
                                value=h["active"] - h["waiting_for_pages"])
        yield GaugeMetricFamily("fastdllm_requests_waiting",
                                "Requests queued for a batch place or for KV pages",
                                value=h["waiting"] + h["waiting_for_pages"])
        yield GaugeMetricFamily("fastdllm_kv_cache_usage", "Fraction of KV-cache pages in use (0-1)",
                                value=kv["usage"])
        yield GaugeMetricFamily("fastdllm_kv_cache_pages_free",
                                "KV-cache pages free or held only by the prefix cache", value=kv["pages_free"])
        yield CounterMetricFamily("fastdllm_prefix_cache_queried_tokens",
                                  "Prompt tokens looked up in the prefix cache",
                                  value=kv["prefix_queried_tokens"])
        yield CounterMetricFamily("fastdllm_prefix_cache_hit_tokens",
                                  "Prompt tokens whose KV came from the prefix cache",
                                  value=kv["prefix_hit_tokens"])
        yield CounterMetricFamily("fastdllm_generated_tokens", "Tokens generated (final)",
                                  value=s.stats.generated_tokens)
        yield CounterMetricFamily("fastdllm_preemptions", "Sequences preempted for KV pages",
                                  value=kv["preemptions"])
        yield CounterMetricFamily("fastdllm_requests_finished", "Requests finished",
                                  value=s.stats.finished)
