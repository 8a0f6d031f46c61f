"""The ingester against a real broker that misbehaves: paused for 20 s, shared by two
instances of one consumer group, and faster than the buffer can write (backpressure)."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path

from replay.buffer import ReplayBuffer
from replay.embed import SentenceEmbedder
from streams.broker import LocalBroker
from streams.ingest import ensure_topics
from streams.produce import TicketProducer
from streams.records import TicketRecord
from tests.conftest import freeze, wait_for
from tests.streams.conftest import ingesting, kafka_settings


def values(prefix: str, n: int) -> list[bytes]:
    return [json.dumps({"id": f"{prefix}-{i}", "text": f"{prefix} ticket number {i}", "label": "x"}).encode()
            for i in range(n)]


class CountingSink:
    """A real sink that keeps every id it was handed (redeliveries included) and writes through."""

    def __init__(self, buffer: ReplayBuffer, delay: float = 0.0) -> None:
        self.buffer = buffer
        self.delay = delay
        self.seen: list[str] = []
        self.writes: list[int] = []

    def add_many(self, records: Sequence[TicketRecord]) -> None:
        time.sleep(self.delay)  # a slow disk or embedder
        self.buffer.add_many(records)
        self.seen.extend(r.id for r in records)
        self.writes.append(len(records))


def stored_ids(buffer: ReplayBuffer) -> set[str]:
    windows = [w.id for w in buffer.windows()]
    return {r.id for probe in (False, True) for r in buffer.records(windows, probe=probe)}


def test_broker_paused_for_20_s_then_resumes_from_committed_offsets(
        broker: LocalBroker, tmp_path: Path, embedder: SentenceEmbedder) -> None:
    settings = kafka_settings(broker.bootstrap)
    ensure_topics(broker.bootstrap, settings)
    producer = TicketProducer(broker.bootstrap, settings.topic)
    sink = CountingSink(ReplayBuffer(tmp_path, embedder))
    with ingesting(settings, sink) as (ingester, thread):
        producer.send_all(values("before", 40))
        wait_for(lambda: len(sink.buffer) == 40, 30, "the first tickets")
        wait_for(lambda: sum(ingester.stats.committed.values()) == 40, 10, "their offsets committed")
        freeze(broker.pid)
        try:
            poll_thread = time.pthread_getcpuclockid(thread.ident)  # other tests' threads share the process
            cpu = time.clock_gettime(poll_thread)
            time.sleep(20)
            busy = time.clock_gettime(poll_thread) - cpu
            assert thread.is_alive()  # no crash while the broker does not answer
        finally:
            os.kill(broker.pid, signal.SIGCONT)
        # kafka-python busy-waits in the polling thread while its heartbeat goes unanswered (6.8 s of
        # that thread's CPU in these 20 s before the ingester backed off from it, 1.6 s after); the
        # wait is counted where operators see it.
        assert busy < 3.5, f"{busy:.1f} s of the polling thread's CPU in a 20 s broker stop"
        assert ingester.stats.unanswered_polls > 0
        producer.send_all(values("after", 40))
        wait_for(lambda: len(sink.buffer) == 80, 60, "the tickets sent after the pause")
        wait_for(lambda: sum(ingester.stats.committed.values()) == 80, 30, "every offset committed")
        assert thread.is_alive()
        wait_for(lambda: ingester.stats.lag and not any(ingester.stats.lag.values()), 10, "zero lag")
    producer.close()
    assert stored_ids(sink.buffer) == {f"{p}-{i}" for p in ("before", "after") for i in range(40)}
    # Resumed from the committed offsets: what was stored and committed before the pause is not
    # consumed again (a batch in flight during the pause may be, and the buffer dedups it).
    assert sink.seen.count("before-0") == 1


def test_two_instances_in_one_group_share_the_partitions(
        broker: LocalBroker, tmp_path: Path, embedder: SentenceEmbedder) -> None:
    settings = kafka_settings(broker.bootstrap, partitions=2)
    ensure_topics(broker.bootstrap, settings)
    sinks = [CountingSink(ReplayBuffer(tmp_path / name, embedder)) for name in ("a", "b")]
    with ingesting(settings, sinks[0]) as (first, _), ingesting(settings, sinks[1]) as (second, _):
        # Produce once the group settled with one partition each, so no rebalance moves a
        # partition mid-stream (that would be a legitimate redelivery to the other instance).
        wait_for(lambda: len(first.stats.assigned) == len(second.stats.assigned) == 1, 30,
                 "one partition per instance")
        producer = TicketProducer(broker.bootstrap, settings.topic)
        producer.send_all(values("t", 200))
        producer.close()
        wait_for(lambda: sum(len(s.buffer) for s in sinks) >= 200, 60, "every ticket stored")
        partitions = [set(ingester.stats.assigned) for ingester in (first, second)]
    ids = [stored_ids(s.buffer) for s in sinks]
    assert ids[0] and ids[1], "one instance got nothing"
    assert ids[0] | ids[1] == {f"t-{i}" for i in range(200)}
    assert not ids[0] & ids[1]  # each partition has one owner: no ticket stored twice
    assert partitions[0] and partitions[1] and not partitions[0] & partitions[1]


def test_a_slow_buffer_pauses_fetching_instead_of_queueing_without_bound(
        broker: LocalBroker, tmp_path: Path, embedder: SentenceEmbedder) -> None:
    settings = kafka_settings(broker.bootstrap, partitions=1, batch_size=10, queue_batches=2,
                                    write_batch_records=20)
    ensure_topics(broker.bootstrap, settings)
    producer = TicketProducer(broker.bootstrap, settings.topic)
    producer.send_all(values("slow", 200))
    producer.close()
    sink = CountingSink(ReplayBuffer(tmp_path, embedder), delay=0.3)
    queued: list[int] = []
    paused_lag: list[int] = []
    with ingesting(settings, sink) as (ingester, _):
        deadline = time.monotonic() + 60
        while len(sink.buffer) < 200 and time.monotonic() < deadline:
            queued.append(ingester.stats.queued_batches)
            if ingester.stats.paused:
                paused_lag.extend(ingester.stats.lag.values())
            time.sleep(0.05)
    assert len(sink.buffer) == 200
    assert max(queued) <= 2  # the queue bound held
    assert paused_lag and max(paused_lag) > 0  # fetching paused while records were waiting
    assert max(sink.writes) > settings.batch_size  # the writer merged batches into one write


def test_a_broker_that_comes_back_empty_is_read_from_its_start(tmp_path: Path, embedder: SentenceEmbedder) -> None:
    """Tansu keeps its log in memory: restarted, the topic is new and its offsets start at 0 again.
    The new log grows past where the ingester had read (5): had it kept that position, the new
    log's first 5 tickets would be skipped. It rejoins the group, which the new broker does not
    know, and reads from the start (measured: stored within 3 s)."""
    first = LocalBroker()
    first.start()
    settings = kafka_settings(first.bootstrap)
    ensure_topics(first.bootstrap, settings)
    sink = CountingSink(ReplayBuffer(tmp_path, embedder))
    with ingesting(settings, sink) as (ingester, _):
        producer = TicketProducer(first.bootstrap, settings.topic)
        producer.send_all(values("before", 5))
        producer.close()
        wait_for(lambda: sum(ingester.stats.committed.values()) == 5, 30, "the first tickets committed")
        first.stop()
        with LocalBroker(first.port) as second:
            ensure_topics(second.bootstrap, settings)
            producer = TicketProducer(second.bootstrap, settings.topic)
            producer.send_all(values("after", 30))
            producer.close()
            wait_for(lambda: len(sink.buffer) == 35, 60, "the tickets sent to the new log")
    assert stored_ids(sink.buffer) == {f"before-{i}" for i in range(5)} | {f"after-{i}" for i in range(30)}
