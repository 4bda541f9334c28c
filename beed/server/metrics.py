"""Prometheus metrics of a server (`beed serve --metrics-port N`) and of a bootstrap node (`beed
bootstrap --metrics-port N`), with prometheus_client.

A scrape reads the numbers GetInfo reports, computed on the event loop (the exporter's HTTP
thread never touches the server's state itself), and adds a histogram of step times and the
age of the last DHT announcement.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# GetInfo fields that only grow (exported as counters, with Prometheus' _total suffix).
COUNTERS = frozenset(
    {
        "batches",
        "batched_steps",
        "batch_fallbacks",
        "connections_refused",
        "connections_evicted",
        "reader_waits",
        "reader_closed",
        "requests_refused_for_memory",
        "pushes_sent",
        "pushes_received",
        "push_failures",
        "pushes_refused",
        "duplicate_steps",
        "graph_replays",
        "offload_bytes_loaded",
    }
)
STEP_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


class _InfoCollector(Collector):
    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        info = self.metrics.snapshot()
        prefix, counters = self.metrics.prefix, self.metrics.counters
        for name, value in sorted(info.items()):
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if name in counters:
                yield CounterMetricFamily(f"{prefix}_{name}", f"{prefix} {name}", value=value)
            else:
                yield GaugeMetricFamily(f"{prefix}_{name}", f"{prefix} {name}", value=value)
        errors = CounterMetricFamily(
            "beed_errors_sent", "Error answers sent, by code (docs/protocol.md)", labels=["code"]
        )
        for code, count in sorted((info.get("errors_sent") or {}).items()):
            errors.add_metric([str(code)], count)
        yield errors
        traffic = CounterMetricFamily(
            "beed_tensor_bytes",
            "Tensor bytes by direction and codec: raw (as held) and wire (as sent)",
            labels=["direction", "codec", "size"],
        )
        for direction, codecs in sorted((info.get("tensor_bytes") or {}).items()):
            for codec, (raw, wire) in sorted(codecs.items()):
                traffic.add_metric([direction, codec, "raw"], raw)
                traffic.add_metric([direction, codec, "wire"], wire)
        yield traffic
        announced = self.metrics.announced_at
        if announced:
            yield GaugeMetricFamily(
                "beed_announce_age_seconds",
                "Seconds since the record was last announced in the DHT",
                value=time.monotonic() - announced,
            )


class ServerMetrics:
    """The registry of one server, and its exporter."""

    def __init__(
        self,
        info: Callable[[], dict[str, Any]],
        loop: asyncio.AbstractEventLoop,
        *,
        prefix: str = "beed",
        counters: frozenset[str] = COUNTERS,
    ) -> None:
        self._info, self._loop = info, loop
        self.prefix, self.counters = prefix, counters
        self.announced_at = 0.0
        self.registry = CollectorRegistry()
        self.step_seconds = Histogram(
            "beed_step_seconds",
            "Time of a session step on this server, from its arrival to its output",
            ["kind"],
            buckets=STEP_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_InfoCollector(self))
        self._server: Any = None

    def observe_step(self, seconds: float, tokens: int) -> None:
        self.step_seconds.labels(kind="decode" if tokens <= 1 else "prefill").observe(seconds)

    def snapshot(self) -> dict[str, Any]:
        """GetInfo's dict, computed on the event loop (called from the exporter's thread)."""

        async def read() -> dict[str, Any]:
            return self._info()

        try:
            return asyncio.run_coroutine_threadsafe(read(), self._loop).result(timeout=5.0)
        except Exception:
            return {}

    def start(self, host: str, port: int) -> int:
        """Serve /metrics on host:port (0: a free port); the port bound."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        return int(server.server_port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
