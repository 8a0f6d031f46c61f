"""Offsets reach the broker only after the buffer's durable write returned: a write that is
held back or fails leaves the group's offset where it was, and once it lands the offset and
the rows agree (read back by the broker and by a second SQLite connection)."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from kafka import KafkaAdminClient

from replay.buffer import ReplayBuffer
from replay.embed import SentenceEmbedder
from streams.broker import LocalBroker
from streams.config import KafkaSettings
from streams.ingest import Ingester, ensure_topics
from streams.produce import TicketProducer
from streams.records import TicketRecord
from tests.conftest import wait_for
from tests.streams.conftest import ingesting, kafka_settings

TICKETS = 30


class GatedSink:
    """A real buffer behind a gate: each write waits for the gate, then fails `failures` times
    (as a full disk would) before it writes through."""

    def __init__(self, buffer: ReplayBuffer, failures: int) -> None:
        self.buffer = buffer
        self.failures = failures
        self.gate = threading.Event()
        self.entered = threading.Event()

    def add_many(self, records: Sequence[TicketRecord]) -> None:
        self.entered.set()
        self.gate.wait()
        if self.failures:
            self.failures -= 1
            raise sqlite3.OperationalError("database or disk is full")
        self.buffer.add_many(records)


def committed(settings: KafkaSettings) -> int:
    """The group's committed offsets as the broker reports them, summed over partitions."""
    admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap, client_id="test-offsets")
    try:
        offsets = admin.list_group_offsets(settings.group_id).get(settings.group_id, {})
    finally:
        admin.close()
    return sum(max(meta.offset, 0) for tp, meta in offsets.items() if tp.topic == settings.topic)


def stored_rows(path: Path) -> int:
    """Rows another process would read: a fresh connection to the buffer's SQLite file."""
    with sqlite3.connect(path) as db:
        count: int = db.execute("SELECT COUNT(*) FROM records").fetchone()[0]
    return count


def test_offsets_are_committed_only_after_the_durable_write(
        broker: LocalBroker, tmp_path: Path, embedder: SentenceEmbedder) -> None:
    settings = kafka_settings(broker.bootstrap, partitions=1)
    ensure_topics(broker.bootstrap, settings)
    producer = TicketProducer(broker.bootstrap, settings.topic)
    producer.send_all(json.dumps({"id": f"c-{i}", "text": f"order {i} never arrived", "label": "late"}).encode()
                      for i in range(TICKETS))
    producer.close()
    sink = GatedSink(ReplayBuffer(tmp_path, embedder), failures=2)
    rows = tmp_path / "buffer.sqlite3"
    with ingesting(settings, sink) as (ingester, _):
        try:
            wait_for(sink.entered.is_set, 30, "the writer to hold polled records")
            wait_for(lambda: ingester.stats.consumed == TICKETS, 10, "every ticket polled")
            time.sleep(1.0)  # several poll-loop turns, each of which commits what the writer stored
            assert committed(settings) == 0 and stored_rows(rows) == 0
        finally:
            sink.gate.set()  # the write now fails twice, then lands
        seen: list[tuple[int, int]] = []

        def settled() -> bool:
            offset = committed(settings)
            seen.append((offset, stored_rows(rows)))  # read after the offset: rows only grow
            return offset == TICKETS

        wait_for(settled, 30, "the offsets committed after the write")
    assert ingester.stats.write_errors == 2
    assert all(offset <= stored for offset, stored in seen), seen  # never an offset ahead of the rows


def test_an_update_can_wait_until_the_tickets_sent_are_stored(
        broker: LocalBroker, tmp_path: Path, embedder: SentenceEmbedder) -> None:
    """What an update waits for before its snapshot (`Ingester.wait_until_stored`): the group's
    offsets at the topic's end, measured when the wait began; not merely polled tickets."""
    settings = kafka_settings(broker.bootstrap, partitions=2)
    ensure_topics(broker.bootstrap, settings)
    sink = GatedSink(ReplayBuffer(tmp_path, embedder), failures=0)
    with ingesting(settings, sink) as (ingester, _):
        assert ingester.wait_until_stored(5.0)  # an empty topic: nothing to wait for
        producer = TicketProducer(broker.bootstrap, settings.topic)
        producer.send_all(json.dumps({"id": f"w-{i}", "text": f"refund {i} still pending", "label": "refund"}).encode()
                          for i in range(TICKETS))
        producer.close()
        try:
            wait_for(lambda: ingester.stats.consumed == TICKETS, 30, "every ticket polled")
            started = time.monotonic()
            assert not ingester.wait_until_stored(1.0)  # polled, held by the writer, not stored
            assert 1.0 <= time.monotonic() - started < 10.0
        finally:
            sink.gate.set()
        assert ingester.wait_until_stored(30.0)
        assert len(sink.buffer) == TICKETS  # stored by the time it returned, not a moment later


def test_waiting_on_a_broker_that_is_gone_ends_at_its_timeout(tmp_path: Path, embedder: SentenceEmbedder) -> None:
    """An update then learns what is stored rather than hang (the broker's port is closed)."""
    with LocalBroker() as gone:
        bootstrap = gone.bootstrap
    settings = kafka_settings(bootstrap)
    started = time.monotonic()
    assert not Ingester(bootstrap, settings, ReplayBuffer(tmp_path, embedder)).wait_until_stored(2.0)
    assert time.monotonic() - started < 8.0
