"""Helpers of the streaming tests: short-timeout Kafka settings and an ingester thread."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from kafka import KafkaConsumer

from streams.config import KafkaSettings
from streams.ingest import Ingester, RecordSink


def kafka_settings(bootstrap: str, **overrides: object) -> KafkaSettings:
    """Short group timeouts (Tansu holds a JoinGroup until the rebalance timeout)."""
    values: dict[str, object] = dict(bootstrap=bootstrap, max_poll_interval_ms=3000, session_timeout_ms=3000,
                                     poll_timeout_ms=200)
    values.update(overrides)
    return KafkaSettings(**values)  # type: ignore[arg-type]


@contextmanager
def ingesting(settings: KafkaSettings, sink: RecordSink) -> Iterator[tuple[Ingester, threading.Thread]]:
    """An Ingester running on its own thread; stopped (and joined) on exit."""
    assert settings.bootstrap is not None
    ingester = Ingester(settings.bootstrap, settings, sink)
    stop = threading.Event()
    thread = threading.Thread(target=ingester.run, args=(stop,), name="test-ingest", daemon=True)
    thread.start()
    try:
        yield ingester, thread
    finally:
        stop.set()
        thread.join(timeout=30)
        assert not thread.is_alive(), "the ingester did not stop"


def read_topic(bootstrap: str, topic: str, expected: int, timeout_ms: int = 10_000) -> list[bytes]:
    """Every value of a topic from the start (stops `timeout_ms` after the last one)."""
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             consumer_timeout_ms=timeout_ms, max_partition_fetch_bytes=4 * 1024 * 1024)
    values: list[bytes] = []
    try:
        for message in consumer:
            values.append(message.value)
            if len(values) >= expected:
                break
    finally:
        consumer.close()
    return values
