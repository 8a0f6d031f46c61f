"""Producing tickets to Kafka: from a JSONL file, a built-in data set, or the HTTP API."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from kafka import KafkaProducer

from streams.records import TicketRecord


def read_jsonl(path: Path) -> Iterator[bytes]:
    """Raw lines of a JSONL file, sent as they are: the ingester validates, not the producer."""
    with path.open("rb") as handle:
        for line in handle:
            if line.strip():
                yield line.rstrip(b"\r\n")


def encode(ticket: TicketRecord) -> bytes:
    return ticket.model_dump_json(exclude_none=True).encode("utf-8")


class TicketProducer:
    """Sends raw ticket values keyed by id (so one ticket always lands on one partition)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.topic = topic
        self._producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)

    def send(self, value: bytes, key: str | None = None) -> None:
        self._producer.send(self.topic, value=value, key=key.encode() if key else None)

    def send_all(self, values: Iterable[bytes], rate: float | None = None,
                 stop: threading.Event | None = None) -> int:
        """Send every value, at most `rate` per second when given, until `stop` is set;
        returns the count sent."""
        sent = 0
        started = time.monotonic()
        for value in values:
            if stop is not None and stop.is_set():
                break
            key = _ticket_id(value)
            self.send(value, key)
            sent += 1
            if rate:
                ahead = started + sent / rate - time.monotonic()
                if ahead > 0:
                    (stop or threading.Event()).wait(ahead)
        self.flush()
        return sent

    def flush(self) -> None:
        self._producer.flush()

    def close(self) -> None:
        self._producer.close()


def _ticket_id(value: bytes) -> str | None:
    try:
        payload = json.loads(value)
    except ValueError:
        return None
    ticket_id = payload.get("id") if isinstance(payload, dict) else None
    return ticket_id if isinstance(ticket_id, str) else None
