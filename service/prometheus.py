"""Prometheus metrics: request counts and latencies, plus gauges read from the service's state."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, get_args

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from service.update_log import UpdateStatus

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
            unanswered = GaugeMetricFamily("evergreen_ingest_unanswered_polls", "Polls that found the broker "
                                           "not answering the consumer (each followed by an idle pause).")
            unanswered.add_metric([], stats.unanswered_polls)
            yield unanswered
            yield from _ingest_health(s)
        curation = GaugeMetricFamily("evergreen_buffer_curation", "Curation and eviction events by kind "
                                     "(redactions per PII kind, near-duplicates, suspects, evictions, probe rows "
                                     "moved to training so that every label is learned).",
                                     labels=["kind"])
        for kind, count in sorted(s.buffer.stats.items()):
            curation.add_metric([kind], count)
        yield curation
        updates = GaugeMetricFamily("evergreen_updates", "Updates of this process by outcome.",
                                    labels=["status"])
        for status in get_args(UpdateStatus):
            updates.add_metric([status], sum(r.status == status for r in s.updates.history))
        yield updates
        yield from _update_progress(s)
        yield from _update_durations(s)
        privacy = s.updates.privacy
        if privacy.settings.enabled or privacy.entries:
            epsilon = GaugeMetricFamily("evergreen_privacy_epsilon", "Differential privacy of the updates "
                                        "(`train.privacy`): ε spent by every round so far, and the budget, at δ "
                                        "`train.privacy.delta`.", labels=["kind"])
            epsilon.add_metric(["spent"], privacy.spent)
            epsilon.add_metric(["budget"], privacy.settings.epsilon_budget)
            yield epsilon
        yield from _registry_metrics(s)
        batched = GaugeMetricFamily("evergreen_classify_batched", "Classify requests and the batches they ran in.",
                                    labels=["count"])
        batched.add_metric(["requests"], s.batcher.requests)
        batched.add_metric(["batches"], s.batcher.batches)
        yield batched
        in_progress = GaugeMetricFamily("evergreen_classify_in_progress",
                                        "Classify requests being scored (taking turns for the model).")
        in_progress.add_metric([], s.batcher.in_progress)
        yield in_progress
        yield CounterMetricFamily("evergreen_model_steps_aside", "Times a long request (a generation, a prompt "
                                  "read in turns) let waiting requests use the model first.",
                                  value=s.runtime.steps_aside)
        if s.runtime.last_swap_seconds is not None:
            swap = GaugeMetricFamily("evergreen_last_swap_seconds",
                                     "Duration of the last hot-swap (loading the version unless loaded before, "
                                     "then the pointer move).")
            swap.add_metric([], s.runtime.last_swap_seconds)
            yield swap


def _ingest_health(s: Service) -> Iterator[Metric]:
    """Whether ingestion moves, and the rejected messages that could not be dead-lettered."""
    assert s.ingester is not None
    lost = CounterMetricFamily("evergreen_ingest_dead_letters_lost", "Rejected messages skipped without a dead "
                               "letter after `kafka.dlq_attempts` refused writes.", labels=["reason"])
    for reason, count in sorted(s.ingester.stats.dead_letters_lost.items()):
        lost.add_metric([reason], count)
    yield lost
    stalled = GaugeMetricFamily("evergreen_ingest_stalled", "1 while ingestion is stalled (no offset committed "
                                "for `kafka.stall_after_s` while records wait, or the broker unreadable).")
    stalled.add_metric([], int(s.ingester.stalled))
    yield stalled
    since = GaugeMetricFamily("evergreen_ingest_seconds_since_progress",
                              "Seconds since an offset was committed or nothing was left to read.")
    since.add_metric([], s.ingester.stalled_seconds)
    yield since


# Progress field of the running update -> gauge name and help.
PROGRESS_GAUGES = {
    "step": ("evergreen_update_step", "Optimiser steps done by the running update."),
    "steps": ("evergreen_update_steps", "Optimiser steps the running update will take."),
    "loss": ("evergreen_update_loss", "Training loss (answer tokens) at the running update's last step."),
    "penalty": ("evergreen_update_penalty", "EWC penalty at the running update's last step."),
    "tokens_per_s": ("evergreen_update_tokens_per_second", "Training throughput of the running update."),
    "eta_s": ("evergreen_update_eta_seconds", "Estimated training seconds left (the gate comes after)."),
    "trial": ("evergreen_update_trial", "The hyperparameter search's trial training now (absent outside a search)."),
    "trials": ("evergreen_update_trials", "Trials of the running update's hyperparameter search."),
}


def _update_progress(s: Service) -> Iterator[Metric]:
    """Whether an update runs, and its progress as its training process last reported it."""
    record = s.updates.current
    running = GaugeMetricFamily("evergreen_update_running", "1 while an update runs.")
    running.add_metric([], int(record is not None))
    yield running
    progress = record.progress.model_dump(exclude_none=True) if record is not None and record.progress else {}
    for key, (name, help_text) in PROGRESS_GAUGES.items():
        if key in progress:
            gauge = GaugeMetricFamily(name, help_text)
            gauge.add_metric([], progress[key])
            yield gauge


UPDATE_BUCKETS = (10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 3600.0)


def _update_durations(s: Service) -> Iterator[Metric]:
    """Finished updates of this process as a histogram by outcome (rebuilt from the history)."""
    family = HistogramMetricFamily("evergreen_update_duration_seconds", "Duration of finished updates.",
                                   labels=["status"])
    by_status: dict[str, list[float]] = {}
    for record in list(s.updates.history):
        if record.finished_at is not None:
            by_status.setdefault(record.status, []).append(record.finished_at - record.started_at)
    for status, durations in sorted(by_status.items()):
        buckets = [(str(edge), sum(d <= edge for d in durations)) for edge in UPDATE_BUCKETS]
        family.add_metric([status], [*buckets, ("+Inf", len(durations))], sum(durations))
    yield family


def _registry_metrics(s: Service) -> Iterator[Metric]:
    """Gate verdicts over the registry, versions kept and pruned by its retention, and the live
    version's accuracy on every window's probes."""
    verdicts = GaugeMetricFamily("evergreen_gate_verdicts", "Registry versions by gate verdict.",
                                 labels=["verdict"])
    counts = {"accepted": 0, "rejected": 0}
    entries = s.registry.entries()
    for entry in entries:
        if entry.gate is not None:  # the initial version was never gated
            counts[entry.verdict] = counts.get(entry.verdict, 0) + 1
    pruned = sum(entry.pruned_at is not None for entry in entries)
    for verdict, count in sorted(counts.items()):
        verdicts.add_metric([verdict], count)
    yield verdicts
    # A pruned version keeps its record for good, so this count only grows, across restarts too.
    yield CounterMetricFamily("evergreen_registry_pruned", "Registry versions whose weights retention deleted.",
                              value=pruned)
    yield GaugeMetricFamily("evergreen_registry_versions_on_disk",
                            "Registry versions with their weights on disk (bounded by `registry.keep_*`).",
                            value=len(entries) - pruned)
    accuracy = GaugeMetricFamily("evergreen_live_window_accuracy",
                                 "Probe accuracy of the live version per window, from its gate report.",
                                 labels=["window"])
    gate = s.registry.info(s.runtime.version).gate
    for window, score in sorted(gate.candidate.items() if gate is not None else []):
        accuracy.add_metric([str(window)], score.accuracy)
    yield accuracy


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
