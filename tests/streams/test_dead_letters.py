"""Every kind of bad record reaches the dead-letter topic with its reason and origin, through a
real broker, and the consumer keeps going past it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kafka import KafkaProducer

from conftest import wait_for
from replay.buffer import ReplayBuffer
from replay.embed import SentenceEmbedder
from streams.broker import LocalBroker
from streams.ingest import ensure_topics

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
}


def test_each_reason_is_dead_lettered_with_its_origin(broker: LocalBroker, tmp_path: Path,
                                                      embedder: SentenceEmbedder, tools: Any) -> None:
    settings = tools.kafka_settings(broker.bootstrap, strict=True, partitions=1)
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
    with tools.ingesting(settings, buffer) as (ingester, _):
        wait_for(lambda: len(buffer) == len(BAD), 30, "the valid tickets")
        dead = [json.loads(v) for v in tools.read_topic(broker.bootstrap, settings.dlq_topic, len(BAD))]
        counted = dict(ingester.stats.dead_lettered)

    assert len(dead) == len(BAD)
    for letter in dead:
        assert letter["topic"] == settings.topic and letter["partition"] == 0
        assert letter["reason"] == origin[letter["offset"]], letter
        assert letter["detail"]
    huge = next(d for d in dead if d["reason"] == "message_too_large")
    assert len(huge["value_b64"]) > 1024 * 1024  # the original bytes travel with the letter
    expected: dict[str, int] = {}
    for reason in origin.values():
        expected[reason] = expected.get(reason, 0) + 1
    assert counted == expected
    assert {f"ok-{i}" for i in range(len(BAD))} == {r.id for r in buffer.records([1], probe=False)} | {
        r.id for r in buffer.records([1], probe=True)}
