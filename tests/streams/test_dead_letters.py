"""Every kind of bad record reaches the dead-letter topic with its reason and origin, through a
real broker, and the consumer keeps going past it: past a ticket of any size, and past a letter
the broker refuses."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

from kafka import KafkaProducer

from replay.buffer import ReplayBuffer
from replay.embed import SentenceEmbedder
from streams.broker import LocalBroker
from streams.dead_letters import max_letter_bytes
from streams.ingest import ensure_topics
from tests.conftest import wait_for
from tests.streams.conftest import ingesting, kafka_settings, read_topic

BAD = {
    "not_json": b"{this is not json",
    "invalid_utf8": b'{"id": "x", "text": "\xff\xfe"}',
    "not_object": b'["a", "list"]',
    "empty": None,  # a tombstone: no value at all
    "invalid_fields": b'{"text": "no id here"}',
    "invalid_fields ": b'{"id": "", "text": "empty id"}',
    "invalid_fields  ": b'{"id": "t-blank", "text": "   "}',
    "invalid_fields   ": b'{"id": 42, "text": "id of the wrong type"}',
    "invalid_fields    ": b'{"id": "t-label", "text": "ok", "label": ["wrong", "type"]}',
    "text_too_large": json.dumps({"id": "t-big", "text": "x" * (16 * 1024 + 1)}).encode(),
    "message_too_large": json.dumps({"id": "t-huge", "text": "y", "pad": "z" * (1024 * 1024)}).encode(),
    "unknown_fields": b'{"id": "t-unknown", "text": "hello", "priority": "high"}',
    "invalid_messages": b'{"id": "t-turns", "text": "hi", "messages": [{"role": "assistant", "content": "hi"}]}',
}


def test_each_reason_is_dead_lettered_with_its_origin(broker: LocalBroker, tmp_path: Path,
                                                      embedder: SentenceEmbedder) -> None:
    settings = kafka_settings(broker.bootstrap, strict=True, partitions=1)
    ensure_topics(broker.bootstrap, settings)
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, max_request_size=4 * 1024 * 1024)
    origin: dict[int, str] = {}
    for i, (reason, value) in enumerate(BAD.items()):
        # A valid ticket after each bad one: the consumer must never stop at a bad record.
        meta = producer.send(settings.topic, value=value, key=b"k").get(timeout=10)
        origin[meta.offset] = reason.strip()
        producer.send(settings.topic, value=json.dumps({"id": f"ok-{i}", "text": f"valid ticket {i}"}).encode())
    producer.flush()
    producer.close()

    buffer = ReplayBuffer(tmp_path, embedder)
    with ingesting(settings, buffer) as (ingester, _):
        wait_for(lambda: len(buffer) == len(BAD), 30, "the valid tickets")
        dead = [json.loads(v) for v in read_topic(broker.bootstrap, settings.dlq_topic, len(BAD))]
        counted = dict(ingester.stats.dead_lettered)

    assert len(dead) == len(BAD)
    for letter in dead:
        assert letter["topic"] == settings.topic and letter["partition"] == 0
        assert letter["reason"] == origin[letter["offset"]], letter
        assert letter["detail"]
    huge = next(d for d in dead if d["reason"] == "message_too_large")
    original = BAD["message_too_large"]
    assert original is not None
    # The original's first bytes travel with the letter, and enough to recognise the rest.
    assert huge["truncated"] and huge["size"] == len(original)
    assert huge["sha256"] == hashlib.sha256(original).hexdigest()
    assert base64.b64decode(huge["value_b64"]) == original[:settings.dlq_max_original_bytes]
    small = next(d for d in dead if d["reason"] == "not_json")
    assert not small["truncated"] and base64.b64decode(small["value_b64"]) == BAD["not_json"]
    expected: dict[str, int] = {}
    for reason in origin.values():
        expected[reason] = expected.get(reason, 0) + 1
    assert counted == expected
    assert {f"ok-{i}" for i in range(len(BAD))} == {r.id for r in buffer.records([1], probe=False)} | {
        r.id for r in buffer.records([1], probe=True)}


def valid_tickets(prefix: str, n: int) -> list[bytes]:
    return [json.dumps({"id": f"{prefix}-{i}", "text": f"valid ticket {i}"}).encode() for i in range(n)]


def test_an_oversized_ticket_never_stops_ingestion(broker: LocalBroker, tmp_path: Path,
                                                   embedder: SentenceEmbedder) -> None:
    """Issue 13: a 1.7 MB ticket's letter (base64) was over the producer's request limit, and the
    ingester read the same batch again forever."""
    settings = kafka_settings(broker.bootstrap, partitions=1)
    ensure_topics(broker.bootstrap, settings)
    oversized = json.dumps({"id": "t-huge", "text": "z" * 1_700_000}).encode()
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, max_request_size=4 * 1024 * 1024)
    for value in [*valid_tickets("before", 3), oversized, *valid_tickets("after", 3)]:
        producer.send(settings.topic, value=value)
    producer.flush()
    producer.close()

    buffer = ReplayBuffer(tmp_path, embedder)
    with ingesting(settings, buffer) as (ingester, _):
        wait_for(lambda: len(buffer) == 6, 60, "the tickets on both sides of the oversized one")
        wait_for(lambda: sum(ingester.stats.committed.values()) == 7, 10, "every offset committed")
        letters = read_topic(broker.bootstrap, settings.dlq_topic, 1)
        assert ingester.stats.reconnects == 0 and not ingester.stalled
    assert len(letters) == 1 and len(letters[0]) <= max_letter_bytes(settings.dlq_max_original_bytes)
    letter = json.loads(letters[0])
    assert letter["reason"] == "message_too_large" and letter["offset"] == 3
    assert letter["truncated"] and letter["size"] == len(oversized)
    assert letter["sha256"] == hashlib.sha256(oversized).hexdigest()


def test_a_letter_the_broker_refuses_is_retried_then_counted_and_skipped(
        tmp_path: Path, embedder: SentenceEmbedder) -> None:
    # A broker whose schema policy refuses every letter (INVALID_RECORD) but takes the tickets.
    schemas = tmp_path / "schemas"
    schemas.mkdir()
    (schemas / "tickets.json").write_text(json.dumps(
        {"type": "object", "properties": {"value": {"type": "object", "required": ["id"]}}}))
    (schemas / "tickets.dlq.json").write_text(json.dumps(
        {"type": "object", "properties": {"value": {"type": "object", "properties": {"reason": {"type": "integer"}},
                                                    "required": ["reason"]}}}))
    with LocalBroker(schema_registry=schemas) as broker:
        settings = kafka_settings(broker.bootstrap, partitions=1, dlq_attempts=3)
        ensure_topics(broker.bootstrap, settings)
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
        for value in [*valid_tickets("before", 2), b'{"id": "t-blank", "text": "  "}', *valid_tickets("after", 2)]:
            producer.send(settings.topic, value=value, key=b"k").get(timeout=10)
        producer.close()
        buffer = ReplayBuffer(tmp_path / "buffer", embedder)
        with ingesting(settings, buffer) as (ingester, _):
            wait_for(lambda: len(buffer) == 4, 60, "the tickets past the refused letter")
            wait_for(lambda: sum(ingester.stats.committed.values()) == 5, 10, "every offset committed")
            assert dict(ingester.stats.dead_letters_lost) == {"invalid_fields": 1}
            assert not ingester.stats.dead_lettered
            assert ingester.stats.reconnects == 0
