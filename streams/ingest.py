"""Kafka → buffer ingestion: at-least-once, with bad records dead-lettered and never blocking.

Offsets are committed only after the sink has stored a batch durably; the sink is idempotent
by ticket `id`, so a redelivery after a crash never makes a second row.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaError, TopicAlreadyExistsError

from streams.config import KafkaSettings
from streams.records import Rejection, TicketRecord, parse_ticket

LOG = logging.getLogger(__name__)


class RecordSink(Protocol):
    """Where validated records go; `add_many` must be durable when it returns."""

    def add_many(self, records: Sequence[TicketRecord]) -> None: ...


@dataclass
class IngestStats:
    """Running counters, read by the metrics endpoint."""

    consumed: int = 0
    stored: int = 0
    dead_lettered: Counter[str] = field(default_factory=Counter)


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


def dead_letter_value(message: ConsumerRecord, rejection: Rejection) -> bytes:
    """The DLQ payload: the reason plus where the original came from, and its bytes (base64)."""
    original = message.value if message.value is not None else b""
    return json.dumps(
        {
            "reason": rejection.reason,
            "detail": rejection.detail,
            "topic": message.topic,
            "partition": message.partition,
            "offset": message.offset,
            "value_b64": base64.b64encode(original).decode("ascii"),
        }
    ).encode("utf-8")


class Ingester:
    """Consumes the ticket topic in a consumer group and hands valid batches to a sink."""

    def __init__(self, bootstrap: str, settings: KafkaSettings, sink: RecordSink) -> None:
        self.bootstrap = bootstrap
        self.settings = settings
        self.sink = sink
        self.stats = IngestStats()

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
            # The broker's own limit is enforced by parse_ticket; let the fetch carry such records.
            max_partition_fetch_bytes=max(s.max_message_bytes * 2, 1024 * 1024),
        )

    def handle(self, messages: Sequence[ConsumerRecord], producer: KafkaProducer) -> None:
        """Validate one polled batch, dead-letter rejects, store the rest (durably)."""
        s = self.settings
        valid: list[TicketRecord] = []
        for message in messages:
            parsed = parse_ticket(
                message.value,
                max_text_bytes=s.max_text_bytes,
                max_message_bytes=s.max_message_bytes,
                strict=s.strict,
            )
            if isinstance(parsed, Rejection):
                LOG.warning("dead-lettering %s:%d@%d: %s", message.topic, message.partition,
                            message.offset, parsed.detail)
                producer.send(s.dlq_topic, value=dead_letter_value(message, parsed),
                              headers=[("reason", parsed.reason.encode())])
                self.stats.dead_lettered[parsed.reason] += 1
            else:
                valid.append(parsed)
        producer.flush()  # the DLQ must hold the rejects before their offsets are committed
        if valid:
            self.sink.add_many(valid)
        self.stats.consumed += len(messages)
        self.stats.stored += len(valid)

    def run(self, stop: threading.Event) -> None:
        """Poll until `stop` is set; broker errors are logged and retried, never fatal."""
        consumer: KafkaConsumer | None = None
        producer: KafkaProducer | None = None
        while not stop.is_set():
            try:
                if consumer is None or producer is None:
                    ensure_topics(self.bootstrap, self.settings)
                    producer = KafkaProducer(bootstrap_servers=self.bootstrap, acks="all",
                                             max_request_size=self.settings.max_message_bytes * 2)
                    consumer = self._consumer()
                polled = consumer.poll(timeout_ms=self.settings.poll_timeout_ms)
                batch = [m for messages in polled.values() for m in messages]
                if batch:
                    self.handle(batch, producer)
                    consumer.commit()
            except KafkaError as exc:
                # The uncommitted batch is redelivered after reconnecting; the sink dedups it.
                LOG.warning("Kafka error, reconnecting in 1 s: %s", exc)
                for client in (consumer, producer):
                    if client is not None:
                        client.close()
                consumer = producer = None
                stop.wait(1.0)
        for client in (consumer, producer):
            if client is not None:
                client.close()

