"""Dead letters: a bounded copy of each rejected message, written with bounded retries.

A letter keeps at most `kafka.dlq_max_original_bytes` of the original value (base64), with the
original's size and SHA-256, so it always fits the dead-letter producer's request limit: a
rejected message can be any size the broker accepted, and a letter that grows with it (base64
adds a third) would be refused as too large, again on every redelivery. A letter that still
cannot be written is retried `kafka.dlq_attempts` times, then counted as lost, logged as an
error and skipped: one letter never blocks its partition.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import threading
from collections.abc import Sequence

from kafka import KafkaProducer
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaError, KafkaTimeoutError

from streams.config import KafkaSettings
from streams.records import Rejection

LOG = logging.getLogger(__name__)

MAX_DETAIL_CHARS = 512  # a detail can list every unknown field of the message: keep it short
# Everything in a letter but the kept bytes: reason, detail (JSON-escaped, up to 12 bytes per
# character), topic name (at most 249 characters), numbers and keys.
LETTER_OVERHEAD_BYTES = 8 * 1024
RETRY_BACKOFF_S = 0.5
Letter = tuple[ConsumerRecord, Rejection, bytes]  # the message, why, and the letter's value


def max_letter_bytes(keep_bytes: int) -> int:
    """Upper bound of a letter's size when `keep_bytes` of the original are kept.

    >>> max_letter_bytes(3)
    8196
    """
    return 4 * -(-keep_bytes // 3) + LETTER_OVERHEAD_BYTES  # base64: 4 characters per 3 bytes


def dead_letter_value(message: ConsumerRecord, rejection: Rejection, keep_bytes: int) -> bytes:
    """The DLQ payload: why, where from, and the original bytes (base64) up to `keep_bytes`.

    `size` and `sha256` describe the whole original, `truncated` says whether `value_b64` holds
    only its first `keep_bytes` bytes.
    """
    original = message.value if message.value is not None else b""
    kept = original[:keep_bytes]
    return json.dumps(
        {
            "reason": rejection.reason,
            "detail": rejection.detail[:MAX_DETAIL_CHARS],
            "topic": message.topic,
            "partition": message.partition,
            "offset": message.offset,
            "size": len(original),
            "sha256": hashlib.sha256(original).hexdigest(),
            "truncated": len(kept) < len(original),
            "value_b64": base64.b64encode(kept).decode("ascii"),
        }
    ).encode("utf-8")


class DeadLetterWriter:
    """Writes the letters of one polled batch to `kafka.dlq_topic`."""

    def __init__(self, settings: KafkaSettings) -> None:
        self.settings = settings

    def producer_request_bytes(self) -> int:
        """The producer's `max_request_size`: one letter plus the record's own framing."""
        return max_letter_bytes(self.settings.dlq_max_original_bytes) + 1024

    def write(self, producer: KafkaProducer, rejects: Sequence[tuple[ConsumerRecord, Rejection]],
              stop: threading.Event) -> list[Rejection] | None:
        """Write every letter, each at most `dlq_attempts` times; returns the rejections whose
        letters were given up on, or None when `stop` cut the retries short (the batch must then
        stay uncommitted, so that it is dead-lettered again after a restart)."""
        s = self.settings
        pending = [(m, r, dead_letter_value(m, r, s.dlq_max_original_bytes)) for m, r in rejects]
        failed: list[tuple[Letter, KafkaError]] = []
        for attempt in range(1, s.dlq_attempts + 1):
            failed = self._attempt(producer, pending)
            if not failed:
                return []
            pending = [letter for letter, _ in failed]
            if attempt < s.dlq_attempts:
                LOG.warning("%d dead letters not written (attempt %d of %d): %s", len(failed), attempt,
                            s.dlq_attempts, failed[0][1])
                if stop.wait(RETRY_BACKOFF_S * attempt):
                    return None
        for (message, rejection, _), error in failed:
            LOG.error("DEAD LETTER LOST after %d attempts: %s:%d@%d (%s) is skipped without a copy on %s: %s",
                      s.dlq_attempts, message.topic, message.partition, message.offset, rejection.reason,
                      s.dlq_topic, error)
        return [rejection for (_, rejection, _), _ in failed]

    def _attempt(self, producer: KafkaProducer, letters: Sequence[Letter]) -> list[tuple[Letter, KafkaError]]:
        """Send and flush once; the letters that failed, with their errors."""
        failed: list[tuple[Letter, KafkaError]] = []
        sent = []
        for letter in letters:
            try:
                sent.append((letter, producer.send(self.settings.dlq_topic, value=letter[2],
                                                   headers=[("reason", letter[1].reason.encode())])))
            except KafkaError as exc:  # refused before sending: too large, no metadata in time
                failed.append((letter, exc))
        try:
            producer.flush(timeout=self.settings.commit_timeout_ms / 1000)
        except KafkaTimeoutError:
            pass  # the letters not acknowledged yet count as failed below (and may arrive twice)
        for letter, future in sent:
            if not future.is_done:
                failed.append((letter, KafkaTimeoutError("not acknowledged in time")))
            elif future.failed():
                failed.append((letter, future.exception))
        return failed
