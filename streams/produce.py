"""Producing tickets to Kafka: from a JSONL file, a built-in data set, or the HTTP API."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from kafka import KafkaProducer

from streams.datasets import Order
from streams.records import TicketRecord


def read_jsonl(path: Path) -> Iterator[bytes]:
    """Raw lines of a JSONL file, sent as they are: the ingester validates, not the producer."""
    with path.open("rb") as handle:
        for line in handle:
            if line.strip():
                yield line.rstrip(b"\r\n")


def order_lines(lines: Sequence[bytes], *, order: Order = "class-incremental", windows: int = 1,
                seed: int = 0) -> list[bytes]:
    """Order raw JSONL lines as a stream, as `stream_order` does for a data set.

    `class-incremental`: the labels, in order of first appearance, are split into `windows`
    consecutive groups; each window holds its labels' lines, shuffled. A line without a label
    (or not JSON: it is sent as it is, for the dead-letter topic) stays in the window of its
    position in the file. `random`: every line shuffled.

    Examples
    --------
    >>> rows = [b'{"id": "%d", "text": "t", "label": "%s"}' % (i, b"ab"[i % 2:i % 2 + 1]) for i in range(4)]
    >>> [json.loads(r)["label"] for r in order_lines(rows, windows=2)]
    ['a', 'a', 'b', 'b']
    """
    rng = random.Random(seed)
    if order == "random":
        shuffled = list(lines)
        rng.shuffle(shuffled)
        return shuffled
    labels = [_field(line, "label") for line in lines]
    distinct = list(dict.fromkeys(label for label in labels if label is not None))
    per_window = max(1, -(-len(distinct) // windows))  # ceiling division
    window_of = {label: i // per_window for i, label in enumerate(distinct)}
    buckets: list[list[bytes]] = [[] for _ in range(windows)]
    for position, (line, label) in enumerate(zip(lines, labels, strict=True)):
        w = window_of[label] if label is not None else position * windows // max(len(lines), 1)
        buckets[min(w, windows - 1)].append(line)
    for bucket in buckets:
        rng.shuffle(bucket)
    return [line for bucket in buckets for line in bucket]


def encode(ticket: TicketRecord) -> bytes:
    return ticket.model_dump_json(exclude_none=True).encode("utf-8")


class TicketProducer:
    """Sends raw ticket values keyed by id (so one ticket always lands on one partition)."""

    def __init__(self, bootstrap: str, topic: str, *, max_block_ms: int = 60_000,
                 max_request_size: int = 2 * 1024 * 1024, bootstrap_timeout_ms: int | None = None) -> None:
        """Connects at once: raises `KafkaTimeoutError` when the broker does not answer within
        `bootstrap_timeout_ms` (default `max_block_ms`; kafka-python's own default is 30 s)."""
        self.topic = topic
        self._producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5,
                                       max_block_ms=max_block_ms, max_request_size=max_request_size,
                                       bootstrap_timeout_ms=bootstrap_timeout_ms or max_block_ms,
                                       reconnect_backoff_max_ms=2000)

    def send(self, value: bytes, key: str | None = None) -> None:
        self._producer.send(self.topic, value=value, key=key.encode() if key else None)

    def send_confirmed(self, values: Sequence[bytes], timeout_s: float) -> None:
        """Send every value and wait until the broker acknowledged all of them (`acks=all`);
        raises a `KafkaError` (for example `KafkaTimeoutError`) when it did not in time."""
        deadline = time.monotonic() + timeout_s
        futures = [self._producer.send(self.topic, value=v, key=(k.encode() if (k := _ticket_id(v)) else None))
                   for v in values]
        self._producer.flush(timeout=max(deadline - time.monotonic(), 0.001))
        for future in futures:
            future.get(timeout=max(deadline - time.monotonic(), 0.001))

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
    return _field(value, "id")


def _field(value: bytes, name: str) -> str | None:
    """A string field of a JSON object, or None for anything else (the ingester judges it)."""
    try:
        payload = json.loads(value)
    except ValueError:
        return None
    found = payload.get(name) if isinstance(payload, dict) else None
    return found if isinstance(found, str) else None


def source_values(source: str, *, order: Order = "class-incremental", windows: int = 3,
                  intents_per_window: int = 4, per_intent: int | None = None, seed: int = 0) -> list[bytes]:
    """The values `evergreen produce SOURCE` sends: a data set's train split streamed in
    `order` (`intents_per_window` new intents per window), or a JSONL file's lines ordered
    into `windows` windows by label."""
    from streams.datasets import DATASETS, load_tickets, stream_order

    if order not in ("random", "class-incremental"):
        raise ValueError(f"unknown order {order!r}: `random` or `class-incremental`")
    if source in DATASETS:
        return [encode(t) for t in stream_order(load_tickets(source, "train"), order=order, windows=windows,
                                                intents_per_window=intents_per_window,
                                                per_intent=per_intent, seed=seed)]
    if Path(source).is_file():
        return order_lines(list(read_jsonl(Path(source))), order=order, windows=windows, seed=seed)
    raise ValueError(f"{source!r} is neither a file nor one of {', '.join(DATASETS)}")
