"""Kafka → buffer ingestion: at-least-once, with bad records dead-lettered and never blocking.

Two threads and a bounded queue between them:

    poll loop ── validated batch + its offsets ──► queue (bounded) ──► writer ──► sink.add_many
        ▲                                                                │
        └──────────── offsets of stored batches (commit) ◄───────────────┘

The poll loop owns the consumer (kafka-python clients are not thread-safe): it validates,
dead-letters rejects, queues the rest, and commits only offsets the writer reports as stored,
so delivery is at least once; the sink is idempotent by ticket `id`, so a redelivery after a
crash never makes a second row. The writer merges queued batches into one `add_many` call
(one embedding pass over many records). When the queue is full the loop pauses its partitions
and keeps polling, which keeps the group membership alive without fetching more.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, OffsetAndMetadata, TopicPartition
from kafka.admin import NewTopic
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import CommitFailedError, KafkaError, TopicAlreadyExistsError

from streams.config import KafkaSettings
from streams.dead_letters import DeadLetterWriter
from streams.records import Rejection, TicketRecord, parse_ticket

LOG = logging.getLogger(__name__)
Offsets = dict[TopicPartition, int]  # next offset to read, per partition
# An idle poll costs its thread about 0.2 % of its time in CPU; a spinning one 8-30 % here, under load.
SPIN_CPU_SHARE = 0.02
PROBE_POLL_MS = 50  # how long a poll may spin while the broker leaves the consumer unanswered


class RecordSink(Protocol):
    """Where validated records go; `add_many` must be durable when it returns."""

    def add_many(self, records: Sequence[TicketRecord]) -> None: ...


@dataclass
class IngestStats:
    """Running counters, read by the metrics endpoint."""

    consumed: int = 0
    stored: int = 0
    dead_lettered: Counter[str] = field(default_factory=Counter)
    dead_letters_lost: Counter[str] = field(default_factory=Counter)  # rejects skipped without a letter
    lag: dict[tuple[str, int], int] = field(default_factory=dict)  # (topic, partition) → records behind
    committed: dict[tuple[str, int], int] = field(default_factory=dict)  # last committed offset
    assigned: tuple[tuple[str, int], ...] = ()  # partitions this instance owns now
    queued_batches: int = 0
    paused: bool = False  # backpressure is on
    reconnects: int = 0
    unanswered_polls: int = 0  # empty polls spent busy-waiting on a broker that does not answer
    write_errors: int = 0
    # Last time ingestion was seen moving: an offset committed, or nothing left to read.
    progress_at: float = field(default_factory=time.monotonic)


def ensure_topics(bootstrap: str, settings: KafkaSettings) -> None:
    """Create the ticket and dead-letter topics when they do not exist yet."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="evergreen-admin")
    try:
        existing = set(admin.list_topics())
        wanted = [
            NewTopic(name, settings.partitions, 1)
            for name in (settings.topic, settings.dlq_topic)
            if name not in existing
        ]
        if wanted:
            try:
                admin.create_topics(wanted)
            except TopicAlreadyExistsError:
                pass  # another instance won the race
    finally:
        admin.close()


@dataclass
class _Batch:
    records: list[TicketRecord]
    offsets: Offsets
    log_epoch: int  # which incarnation of the topic the offsets belong to


class Ingester:
    """Consumes the ticket topic in a consumer group and hands valid batches to a sink."""

    def __init__(self, bootstrap: str, settings: KafkaSettings, sink: RecordSink) -> None:
        self.bootstrap = bootstrap
        self.settings = settings
        self.sink = sink
        self.stats = IngestStats()
        self.dead_letters = DeadLetterWriter(settings)
        self._queue: queue.Queue[_Batch] = queue.Queue(maxsize=settings.queue_batches)
        self._stored: queue.SimpleQueue[tuple[int, Offsets]] = queue.SimpleQueue()  # writer → poll loop
        # The topic's id, and how many times it changed: a topic recreated starts its offsets over.
        self._topic_id: uuid.UUID | None = None
        self._log_epoch = 0
        # First offset this instance read, per partition: where its uncommitted work begins.
        self._first_read: dict[tuple[str, int], int] = {}
        self._unanswered = False  # the last poll spun: the broker leaves the consumer unanswered

    @property
    def stalled_seconds(self) -> float:
        """Seconds since ingestion last moved: an offset committed, or nothing left to read."""
        return time.monotonic() - self.stats.progress_at

    @property
    def stalled(self) -> bool:
        """No progress for `kafka.stall_after_s` while records wait, or the broker was unreadable."""
        return self.stalled_seconds > self.settings.stall_after_s

    # -- clients ----------------------------------------------------------------------------
    def _consumer(self) -> KafkaConsumer:
        s = self.settings
        return KafkaConsumer(
            s.topic,
            bootstrap_servers=self.bootstrap,
            group_id=s.group_id,
            client_id="evergreen-ingest",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=s.batch_size,
            max_poll_interval_ms=s.max_poll_interval_ms,
            session_timeout_ms=s.session_timeout_ms,
            heartbeat_interval_ms=max(s.session_timeout_ms // 3, 100),
            reconnect_backoff_max_ms=s.reconnect_backoff_max_ms,
            # The broker's own limit is enforced by parse_ticket; let the fetch carry such records.
            max_partition_fetch_bytes=max(s.max_message_bytes * 2, 1024 * 1024),
        )

    def _producer(self) -> KafkaProducer:
        s = self.settings
        # Not idempotent: kafka-python's idempotent producer refuses every later send once the
        # broker refused one record, and one refused letter must not stop the next (duplicate
        # letters after a retry are harmless).
        return KafkaProducer(bootstrap_servers=self.bootstrap, acks="all", enable_idempotence=False,
                             max_request_size=self.dead_letters.producer_request_bytes(),
                             max_block_ms=s.commit_timeout_ms,
                             reconnect_backoff_max_ms=s.reconnect_backoff_max_ms)

    def wait_until_stored(self, timeout_s: float) -> bool:
        """Wait until every record the topic holds now is stored (or dead-lettered) and its offset
        committed by the group; whether that happened within `timeout_s`.

        An update started as soon as `evergreen produce` returned would otherwise snapshot the
        buffer before the ingester had read the new tickets. The group's committed offsets are the
        measure: they move only after a durable write, and they survive restarts (the ingester's
        own counters start empty). A broker that cannot be reached ends the wait as not caught up.
        """
        deadline = time.monotonic() + timeout_s
        s = self.settings
        try:
            reader = KafkaConsumer(bootstrap_servers=self.bootstrap, group_id=s.group_id,
                                   client_id="evergreen-catch-up", enable_auto_commit=False,
                                   bootstrap_timeout_ms=max(int(timeout_s * 1000), 1000),
                                   request_timeout_ms=max(s.commit_timeout_ms, 1000) + 1000,
                                   reconnect_backoff_max_ms=s.reconnect_backoff_max_ms)
        except KafkaError as exc:
            LOG.warning("cannot ask the broker what is left to ingest: %s", exc)
            return False
        try:
            partitions = [TopicPartition(s.topic, p) for p in sorted(reader.partitions_for_topic(s.topic) or ())]
            ends = reader.end_offsets(partitions, timeout_ms=s.commit_timeout_ms) if partitions else {}
            while True:
                behind = {tp: end for tp, end in ends.items()
                          if end > (reader.committed(tp, timeout_ms=s.commit_timeout_ms) or 0)}
                if not behind:
                    return True
                ends = behind  # a partition once caught up stays so: its end was fixed at the start
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.2)
        except KafkaError as exc:
            LOG.warning("cannot ask the broker what is left to ingest: %s", exc)
            return False
        finally:
            self._close(reader, None)

    # -- the poll side ----------------------------------------------------------------------
    def validate(self, messages: Sequence[ConsumerRecord], producer: KafkaProducer,
                 stop: threading.Event) -> list[TicketRecord] | None:
        """Split one polled batch: dead-letter the rejects, return the valid records (None when
        `stop` interrupted the dead letters' retries: the batch stays uncommitted)."""
        s = self.settings
        valid: list[TicketRecord] = []
        rejects: list[tuple[ConsumerRecord, Rejection]] = []
        for message in messages:
            parsed = parse_ticket(message.value, max_text_bytes=s.max_text_bytes,
                                  max_message_bytes=s.max_message_bytes, strict=s.strict)
            if isinstance(parsed, Rejection):
                LOG.warning("dead-lettering %s:%d@%d: %s", message.topic, message.partition,
                            message.offset, parsed.detail)
                rejects.append((message, parsed))
            else:
                valid.append(parsed)
        # The DLQ holds the rejects (or they were given up on, loudly) before their offsets can
        # be committed.
        lost = self.dead_letters.write(producer, rejects, stop) if rejects else []
        if lost is None:
            return None
        given_up = Counter(r.reason for r in lost)
        self.stats.dead_letters_lost.update(given_up)
        self.stats.dead_lettered.update(Counter(r.reason for _, r in rejects) - given_up)
        self.stats.consumed += len(messages)
        return valid

    def _poll(self, consumer: KafkaConsumer, stop: threading.Event) -> dict[TopicPartition, list[ConsumerRecord]]:
        """One poll; after a poll that busy-waited, an idle pause and short polls until the broker answers.

        While a heartbeat goes unanswered (a broker stopped or overloaded), kafka-python's `poll`
        spins in its own loop until its timeout, allocating on every turn: 0.5-0.8 of a core and
        about 10 MB of resident memory a second while the broker was stopped, kept as a
        high-water mark after it came back. Its own thread's CPU time tells such a poll from one
        that waited for records; a false alarm only delays a poll that would have found nothing.
        """
        timeout_ms = PROBE_POLL_MS if self._unanswered else self.settings.poll_timeout_ms
        cpu, started = time.thread_time(), time.monotonic()
        polled = consumer.poll(timeout_ms=timeout_ms)
        spun = not polled and time.thread_time() - cpu > SPIN_CPU_SHARE * (time.monotonic() - started)
        if spun != self._unanswered:
            LOG.log(logging.WARNING if spun else logging.INFO, "%s", "the broker does not answer the consumer: "
                    "pausing between short polls" if spun else "the broker answers the consumer again")
        self._unanswered = spun
        if spun:
            self.stats.unanswered_polls += 1
            stop.wait(self.settings.poll_timeout_ms / 1000)
        return polled

    def _commit_stored(self, consumer: KafkaConsumer) -> None:
        """Commit the offsets the writer has stored, for partitions this instance still owns."""
        done: Offsets = {}
        while True:
            try:
                log_epoch, offsets = self._stored.get_nowait()
            except queue.Empty:
                break
            if log_epoch == self._log_epoch:  # an older log's offsets would skip the new log's records
                done.update(offsets)  # later batches carry later offsets
        owned = consumer.assignment()
        done = {tp: offset for tp, offset in done.items() if tp in owned}
        if not done:
            return
        try:
            consumer.commit({tp: OffsetAndMetadata(offset, "", -1) for tp, offset in done.items()},
                            timeout_ms=self.settings.commit_timeout_ms)
        except CommitFailedError as exc:
            # A rebalance moved the partition: its new owner redelivers, the sink dedups.
            LOG.info("commit after a rebalance refused, left to the new owner: %s", exc)
            return
        for tp, offset in done.items():
            self.stats.committed[(tp.topic, tp.partition)] = offset
        self.stats.progress_at = time.monotonic()

    def _log_recreated(self, consumer: KafkaConsumer) -> bool:
        """Whether the topic turned out to be a new one since the last poll, and if so, read it from its start.

        A broker that keeps its log in memory comes back empty, and a topic deleted and created
        again starts over too: its offsets begin at 0 again, and kafka-python keeps the old
        positions (a rejoin preserves them for partitions it keeps), so once the new log has grown
        past them the records below would be skipped. The sink dedups what gets read twice.
        """
        # kafka-python exposes a topic's id (KIP-516, metadata v10+) only on its cluster metadata.
        topic_id = consumer._client.cluster.topic_id(self.settings.topic)
        known = self._topic_id
        if topic_id is not None:
            self._topic_id = topic_id
        if known is None or topic_id is None or topic_id == known:
            return False
        LOG.warning("topic %s was recreated (id %s, was %s): reading it again from its start",
                    self.settings.topic, topic_id, known)
        self._log_epoch += 1
        self._first_read.clear()
        self.stats.committed.clear()
        if consumer.assignment():  # partitions assigned later start from the new log's commits or its start
            consumer.seek_to_beginning()
        return True

    def _update_lag(self, consumer: KafkaConsumer) -> None:
        lag: dict[tuple[str, int], int] = {}
        owned = consumer.assignment()
        self.stats.assigned = tuple(sorted((tp.topic, tp.partition) for tp in owned))
        for tp in owned:
            end = consumer.highwater(tp)  # from the last fetch response; no extra request
            if end is None:
                continue
            key = (tp.topic, tp.partition)
            # Behind what is stored and committed; before the first commit, behind where this
            # instance began reading (what it read but did not store yet waits too).
            base = self.stats.committed.get(key, self._first_read.get(key))
            if base is not None:
                lag[key] = max(end - base, 0)
        self.stats.lag = lag

    def _backpressure(self, consumer: KafkaConsumer) -> None:
        full = self._queue.full()
        if full and not self.stats.paused:
            consumer.pause(*consumer.assignment())
            LOG.info("buffer writer behind (%d batches queued): pausing fetches", self._queue.qsize())
        elif not full and self.stats.paused:
            consumer.resume(*consumer.paused())
        self.stats.paused = full

    def _enqueue(self, batch: _Batch, stop: threading.Event) -> None:
        # Fetching is paused while the queue is full, but partitions assigned during this poll
        # were not yet paused: wait in short steps (the heartbeat runs on its own thread).
        while not stop.is_set():
            try:
                self._queue.put(batch, timeout=0.5)
                return
            except queue.Full:
                continue

    def run(self, stop: threading.Event) -> None:
        """Poll until `stop` is set; broker errors are logged and retried, never fatal.

        On stop, the queued batches are written and their offsets committed before returning.
        """
        writer = threading.Thread(target=self._write_loop, args=(stop,), name="ingest-writer", daemon=True)
        writer.start()
        consumer: KafkaConsumer | None = None
        producer: KafkaProducer | None = None
        while not stop.is_set():
            try:
                if consumer is None or producer is None:
                    ensure_topics(self.bootstrap, self.settings)
                    producer = self._producer()
                    consumer = self._consumer()
                    self.stats.paused = False
                self._backpressure(consumer)
                polled = self._poll(consumer, stop)
                if self._log_recreated(consumer):
                    continue  # what this poll fetched was read at the old log's positions
                batch = [m for messages in polled.values() for m in messages]
                if batch:
                    valid = self.validate(batch, producer, stop)
                    if valid is None:
                        continue  # stopping: the batch stays uncommitted
                    offsets: Offsets = {}
                    for m in batch:
                        tp = TopicPartition(m.topic, m.partition)
                        offsets[tp] = max(offsets.get(tp, 0), m.offset + 1)
                        self._first_read.setdefault((m.topic, m.partition), m.offset)
                    self._enqueue(_Batch(valid, offsets, self._log_epoch), stop)
                    self.stats.queued_batches = self._queue.qsize()
                self._commit_stored(consumer)
                self._update_lag(consumer)
                if not any(self.stats.lag.values()) and self._queue.empty():
                    self.stats.progress_at = time.monotonic()  # caught up: nothing waits
            except KafkaError as exc:
                # Uncommitted batches are redelivered after reconnecting; the sink dedups them.
                LOG.warning("Kafka error, reconnecting in 1 s: %s", exc)
                self.stats.reconnects += 1
                self._close(consumer, producer)
                consumer = producer = None
                stop.wait(1.0)
        writer.join(timeout=60)
        if consumer is not None:
            try:
                self._commit_stored(consumer)
            except KafkaError as exc:
                LOG.warning("final commit failed (the batches will be redelivered): %s", exc)
        self._close(consumer, producer)

    @staticmethod
    def _close(consumer: KafkaConsumer | None, producer: KafkaProducer | None) -> None:
        for client in (consumer, producer):
            if client is None:
                continue
            try:
                if isinstance(client, KafkaConsumer):
                    client.close(autocommit=False, timeout_ms=2000)
                else:
                    client.close(timeout=2)
            except Exception as exc:  # closing a client of a dead broker must not stop the loop
                LOG.debug("closing a Kafka client: %s", exc)

    # -- the writer side --------------------------------------------------------------------
    def _write_loop(self, stop: threading.Event) -> None:
        """Merge queued batches into one sink write; report their offsets once stored."""
        while not (stop.is_set() and self._queue.empty()):
            try:
                batches = [self._queue.get(timeout=0.2)]
            except queue.Empty:
                continue
            records = list(batches[0].records)
            while len(records) < self.settings.write_batch_records:
                try:
                    batches.append(self._queue.get_nowait())
                except queue.Empty:
                    break
                records.extend(batches[-1].records)
            if not self._store(records, stop):
                return  # shutting down mid-retry: report nothing past the unstored batch
            for b in batches:
                self._stored.put((b.log_epoch, b.offsets))
            self.stats.stored += len(records)
            self.stats.queued_batches = self._queue.qsize()

    def _store(self, records: list[TicketRecord], stop: threading.Event) -> bool:
        """Write until it succeeds (True), or until stop interrupts a retry (False): nothing
        past a batch is committed before the batch is stored."""
        delay = 0.5
        while True:
            try:
                if records:
                    self.sink.add_many(records)
                return True
            except Exception:
                self.stats.write_errors += 1
                LOG.exception("buffer write of %d records failed; retrying in %.1f s", len(records), delay)
                if stop.wait(delay):
                    return False  # shutting down: the batch stays uncommitted and is redelivered
                delay = min(delay * 2, 30.0)
