from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field

from service.deps import ServiceDep

router = APIRouter(prefix="/v1", tags=["buffer"])

REDACTED = "redacted_"  # prefix of the buffer's per-PII-kind redaction counters


class WindowPublic(BaseModel):
    id: int
    closed: bool
    train_size: int
    probe_size: int
    labels: list[str]


class PartitionLag(BaseModel):
    topic: str
    partition: int
    lag: int = Field(description="Records behind the end of the partition, from the last committed offset.")


class IngestPublic(BaseModel):
    """The Kafka consumer of this instance (counters since the process started)."""

    consumed: int
    stored: int = Field(description="Valid records handed to the buffer (a redelivery counts again).")
    lag: list[PartitionLag] = Field(description="Per partition this instance owns.")
    total_lag: int
    paused: bool = Field(description="Fetching is paused because the buffer writer is behind.")
    reconnects: int
    unanswered_polls: int = Field(description="Polls that found the broker not answering the consumer.")
    stalled: bool = Field(description="No offset committed for `kafka.stall_after_s` while records wait, or "
                                      "the broker could not be read (`GET /healthz/ingest` answers 503).")
    seconds_since_progress: float = Field(description="Since an offset was last committed or nothing was left "
                                                      "to read.")
    dead_letters_lost: dict[str, int] = Field(description="Rejected messages skipped without a dead letter "
                                                          "(the broker refused it `kafka.dlq_attempts` times), "
                                                          "by reason.")


class IndexPublic(BaseModel):
    """The FAISS index over the buffer's embeddings (`replay.index`)."""

    kind: str = Field(description="`flat`, `ivf`, `hnsw` or `pq`: chosen by size unless `replay.index` fixes it.")
    vectors: int = Field(description="Vectors held, tombstones included.")
    tombstones: int = Field(description="Vectors of evicted rows still in an HNSW index until its next rebuild.")


class BufferPublic(BaseModel):
    records: int
    pending: int = Field(description="Records in the open window: what the next update learns.")
    windows: list[WindowPublic]
    labels: dict[str, int] = Field(description="Stored records per label.")
    duplicates_dropped: int = Field(description="Near-duplicates never stored, over the buffer's life.")
    evicted: int = Field(description="Training rows evicted to respect `replay.capacity`, over the buffer's life.")
    redactions: dict[str, int] = Field(description="PII redactions per kind since this process started.")
    suspects: int = Field(description="Records flagged as likely mislabelled since this process started.")
    dead_lettered: dict[str, int] = Field(description="Messages sent to the dead-letter topic, by reason.")
    index: IndexPublic
    ingest: IngestPublic | None = Field(description="Null when this instance does not consume Kafka.")


@router.get("/buffer")
def buffer_summary(service: ServiceDep) -> BufferPublic:
    """Replay buffer size, labels, curation counts, windows with their train/probe split, and
    the consumer's dead letters and lag."""
    buffer, ingester = service.buffer, service.ingester
    skipped, stats = buffer.skipped_counts(), dict(buffer.stats)
    ingest = None
    if ingester is not None:
        s = ingester.stats
        lag = [PartitionLag(topic=t, partition=p, lag=n) for (t, p), n in sorted(s.lag.items())]
        ingest = IngestPublic(consumed=s.consumed, stored=s.stored, lag=lag, total_lag=sum(x.lag for x in lag),
                              paused=s.paused, reconnects=s.reconnects,
                              unanswered_polls=s.unanswered_polls, stalled=ingester.stalled,
                              seconds_since_progress=ingester.stalled_seconds,
                              dead_letters_lost=dict(s.dead_letters_lost))
    return BufferPublic(
        records=len(buffer), pending=buffer.pending(),
        windows=[WindowPublic(id=w.id, closed=w.closed, train_size=w.train_size,
                              probe_size=w.probe_size, labels=list(w.labels))
                 for w in buffer.windows()],
        labels=buffer.label_counts(),
        duplicates_dropped=skipped.get("near_duplicate", 0), evicted=skipped.get("evicted", 0),
        redactions={k.removeprefix(REDACTED): n for k, n in sorted(stats.items()) if k.startswith(REDACTED)},
        suspects=stats.get("suspect", 0),
        dead_lettered=dict(ingester.stats.dead_lettered) if ingester else {},
        index=IndexPublic(**buffer.index_state()._asdict()),
        ingest=ingest,
    )
