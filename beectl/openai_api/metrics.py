"""Prometheus metrics of `beectl api` (GET /metrics): requests, latencies, the shared head."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from beectl.head_batch import HeadBatcher

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class _HeadCollector(Collector):
    def __init__(self, head: Callable[[], HeadBatcher]) -> None:
        self.head = head

    def collect(self) -> Iterator[Metric]:
        head = self.head()
        yield CounterMetricFamily(
            "beectl_api_head_products", "LM head products run", value=head.flushes
        )
        yield CounterMetricFamily(
            "beectl_api_head_rows",
            "Rows through the LM head (rows/products: batching)",
            value=head.rows,
        )


class ApiMetrics:
    def __init__(self, head: Callable[[], HeadBatcher]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "beectl_api_requests",
            "Requests answered, by endpoint and HTTP status",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.seconds = Histogram(
            "beectl_api_request_seconds",
            "Time from a request's arrival to its last byte",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.first_token = Histogram(
            "beectl_api_first_token_seconds",
            "Time from a generation request's arrival to its first token",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "beectl_api_completion_tokens", "Tokens generated", registry=self.registry
        )
        self.active = Gauge(
            "beectl_api_active_requests", "Requests being answered now", registry=self.registry
        )
        self.registry.register(_HeadCollector(head))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
