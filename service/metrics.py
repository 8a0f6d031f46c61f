"""Prometheus metrics: request counts and latencies, plus gauges read from the service's state."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, get_args

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from service.updates import UpdateStatus

if TYPE_CHECKING:
    from service.core import Service


class ServiceCollector(Collector):
    """Reads live state at scrape time, so gauges are never stale."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        s = self.service
        live = InfoMetricFamily("evergreen_live_adapter", "Adapter version being served.")
        live.add_metric([], {"version": s.runtime.version})
        yield live
        size = GaugeMetricFamily("evergreen_buffer_records", "Records in the replay buffer.")
        size.add_metric([], len(s.buffer))
        yield size
        pending = GaugeMetricFamily("evergreen_buffer_pending_records", "Records in the open window.")
        pending.add_metric([], s.buffer.pending())
        yield pending
        if s.ingester is not None:
            stats = s.ingester.stats
            consumed = GaugeMetricFamily("evergreen_ingest_consumed", "Messages consumed.")
            consumed.add_metric([], stats.consumed)
            yield consumed
            dlq = GaugeMetricFamily("evergreen_ingest_dead_lettered", "Messages dead-lettered.",
                                    labels=["reason"])
            for reason, count in sorted(stats.dead_lettered.items()):
                dlq.add_metric([reason], count)
            yield dlq
            stored = GaugeMetricFamily("evergreen_ingest_stored", "Valid records handed to the buffer "
                                       "(a redelivery is handed again, stored once).")
            stored.add_metric([], stats.stored)
            yield stored
            lag = GaugeMetricFamily("evergreen_ingest_lag", "Records behind the end of each partition, "
                                    "counted from the last committed (stored) offset.",
                                    labels=["topic", "partition"])
            for (topic, partition), behind in sorted(stats.lag.items()):
                lag.add_metric([topic, str(partition)], behind)
            yield lag
            queued = GaugeMetricFamily("evergreen_ingest_queued_batches", "Batches waiting for the buffer writer.")
            queued.add_metric([], stats.queued_batches)
            yield queued
            paused = GaugeMetricFamily("evergreen_ingest_paused", "1 while fetching is paused (backpressure).")
            paused.add_metric([], int(stats.paused))
            yield paused
            reconnects = GaugeMetricFamily("evergreen_ingest_reconnects", "Reconnections after broker errors.")
            reconnects.add_metric([], stats.reconnects)
            yield reconnects
        curation = GaugeMetricFamily("evergreen_buffer_curation", "Curation and eviction events by kind "
                                     "(redactions per PII kind, near-duplicates, suspects, evictions).",
                                     labels=["kind"])
        for kind, count in sorted(s.buffer.stats.items()):
            curation.add_metric([kind], count)
        yield curation
        updates = GaugeMetricFamily("evergreen_updates", "Updates of this process by outcome.",
                                    labels=["status"])
        for status in get_args(UpdateStatus):
            updates.add_metric([status], sum(r.status == status for r in s.updates.history))
        yield updates


class HttpMetrics:
    """Per-route request counter and latency histogram, in the service's own registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("evergreen_http_requests", "HTTP requests.",
                                ["method", "route", "status"], registry=registry)
        self.latency = Histogram("evergreen_http_request_seconds", "HTTP request latency.",
                                 ["method", "route"], registry=registry)

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)


def make_registry(service: Service) -> tuple[CollectorRegistry, HttpMetrics]:
    registry = CollectorRegistry()
    registry.register(ServiceCollector(service))
    return registry, HttpMetrics(registry)
