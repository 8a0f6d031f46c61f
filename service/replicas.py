"""More than one replica: the primary publishes every move of the live pointer to a Kafka topic;
serve-only replicas follow that topic and hot-swap, reading versions from the shared registry.

The topic has one partition, so replicas see moves in the order they happened. A replica starts
on the registry's live version, subscribes at the topic's end, then looks at the registry once
more: a move made while it was subscribing is not lost.
"""

from __future__ import annotations

import json
import logging
import threading
import time

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from service.forgetting import AccuracyMatrix
from service.live import LiveVersion
from service.registry import RegistryError
from service.runtime import UnsafeAdapter
from service.settings import ReplicaSettings

LOG = logging.getLogger(__name__)


def ensure_promotion_topic(bootstrap: str, topic: str) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="evergreen-replicas")
    try:
        if topic not in set(admin.list_topics()):
            try:
                admin.create_topics([NewTopic(topic, 1, 1)])
            except TopicAlreadyExistsError:
                pass  # another instance won the race
    finally:
        admin.close()


class PromotionPublisher:
    """Registry listener on the primary: one message per move of the live pointer."""

    def __init__(self, bootstrap: str, settings: ReplicaSettings) -> None:
        ensure_promotion_topic(bootstrap, settings.topic)
        self.topic = settings.topic
        self._producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")

    def __call__(self, version: str, event: str) -> None:
        message = json.dumps({"version": version, "event": event, "at": time.time()}).encode()
        try:
            self._producer.send(self.topic, value=message).get(timeout=10)
            LOG.info("published %s of %s to %s", event, version, self.topic)
        except KafkaError:  # the pointer has moved either way; replicas catch up on restart
            LOG.exception("could not publish %s of %s", event, version)

    def close(self) -> None:
        self._producer.close(timeout=5)


class PromotionFollower:
    """Replica side: swap the runtime to each version announced on the promotion topic."""

    def __init__(self, bootstrap: str, settings: ReplicaSettings, live: LiveVersion, matrix: AccuracyMatrix) -> None:
        ensure_promotion_topic(bootstrap, settings.topic)
        self.live = live
        self.matrix = matrix
        self.poll_timeout_ms = settings.poll_timeout_ms
        self.followed = 0
        self._consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                       client_id="evergreen-replica")
        partition = TopicPartition(settings.topic, 0)
        self._consumer.assign([partition])
        self._consumer.seek_to_end(partition)
        self._consumer.position(partition)  # resolve "the end" now, before looking at the registry
        if (current := live.registry.live) is not None:
            self._swap(current, "start")

    def _swap(self, version: str, event: str) -> None:
        # A promotion follows a gate, which has added to the accuracy matrix the primary writes.
        self.matrix.refresh(force=True)
        try:
            self.live.follow(version)
            self.followed += 1
        except (RegistryError, UnsafeAdapter) as exc:
            LOG.error("cannot follow %s to %s: %s", event, version, exc)

    def run(self, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                try:
                    batches = self._consumer.poll(timeout_ms=self.poll_timeout_ms)
                except KafkaError:
                    LOG.exception("promotion topic poll failed; retrying")
                    stop.wait(1)
                    continue
                for messages in batches.values():
                    for message in messages:
                        try:
                            event = json.loads(message.value)
                            version, kind = str(event["version"]), str(event.get("event", "promote"))
                        except (ValueError, KeyError, TypeError):
                            LOG.warning("ignoring a malformed promotion message at offset %d", message.offset)
                            continue
                        self._swap(version, kind)
        finally:
            self._consumer.close()
