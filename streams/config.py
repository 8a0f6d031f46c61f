"""Settings of the Kafka side: where tickets come from and where bad ones go."""

from __future__ import annotations

from pydantic import BaseModel, Field


class KafkaSettings(BaseModel):
    """Kafka connection, topics and consumer-group behaviour."""

    bootstrap: str | None = Field(
        None,
        description="Bootstrap servers (`host:port,...`). Unset: `evergreen up` starts a local broker.",
    )
    topic: str = Field("tickets", description="Topic the tickets are produced to.")
    dlq_topic: str = Field("tickets.dlq", description="Dead-letter topic for rejected records.")
    partitions: int = Field(2, gt=0, description="Partitions used when the service creates the topic.")
    group_id: str = Field("evergreen-ingest", description="Consumer group of the ingesters.")
    # Tansu holds a JoinGroup until the rebalance timeout, which kafka-python takes from
    # max_poll_interval_ms: the 300 s default makes a group need minutes to start there.
    max_poll_interval_ms: int = Field(10_000, gt=0, description="Consumer max poll interval (ms).")
    session_timeout_ms: int = Field(10_000, gt=0, description="Consumer session timeout (ms).")
    poll_timeout_ms: int = Field(500, gt=0, description="How long one poll waits for records (ms).")
    batch_size: int = Field(64, gt=0, description="Records handed to the buffer at most per batch.")
    max_text_bytes: int = Field(16 * 1024, gt=0, description="Largest accepted `text`, in UTF-8 bytes.")
    max_message_bytes: int = Field(1024 * 1024, gt=0, description="Largest accepted message value.")
    strict: bool = Field(False, description="Dead-letter records that carry unknown fields.")
    # -- dead letters and ingest health ----------------------------------------------------------
    dlq_max_original_bytes: int = Field(
        64 * 1024, gt=0, description="Bytes of a rejected value kept in its dead letter; beyond them the "
        "letter says `truncated` and keeps the original's size and SHA-256, so it always fits a request."
    )
    dlq_attempts: int = Field(
        5, gt=0, description="Attempts to write one dead letter; then it is counted as lost "
        "(`evergreen_ingest_dead_letters_lost_total`), logged as an error and skipped."
    )
    stall_after_s: float = Field(
        120.0, gt=0, description="Ingestion is reported stalled (`GET /healthz/ingest` answers 503) when no "
        "offset was committed for this long while records wait, or the broker could not be read."
    )
    # -- the pipeline between the poll loop and the buffer ---------------------------------------
    # Enough batches for one full write (32 x 64 = write_batch_records): while the writer embeds
    # one merged write, the poll loop queues the next.
    queue_batches: int = Field(
        32, gt=0, description="Polled batches held in memory at most; when full, the partitions are "
        "paused (backpressure) instead of memory growing."
    )
    # Larger merged writes pad less: the embedder sorts each call's texts by length and pads each
    # forward pass to its longest text. On 2,000 BANKING77 texts, writes of at most 512 cost 1.64
    # padded tokens per real token against 1.33 in one call (the ingester ran at ~0.8 of the raw
    # embedding rate); writes of up to 2,048 come within a few per cent of one call. Only a
    # backlog makes them large: a live stream's writes stay small, so its latency is unchanged.
    write_batch_records: int = Field(
        2048, gt=0, description="Queued batches are merged up to this many records per buffer write "
        "(one embedding pass)."
    )
    commit_timeout_ms: int = Field(5_000, gt=0, description="How long an offset commit may wait for the broker.")
    catch_up_timeout_s: float = Field(
        60.0, ge=0, description="How long an update waits for the ingester to store every ticket the topic "
        "held when the update began (0: no wait); past it, the update learns what is stored, and its log says so."
    )
    reconnect_backoff_max_ms: int = Field(
        2_000, gt=0, description="Longest wait between reconnection attempts to an unresponsive broker."
    )
    # -- producing (the HTTP API and `evergreen produce`) ---------------------------------------
    max_request_tickets: int = Field(500, gt=0, description="Most tickets one `POST /v1/tickets` may carry.")
    produce_timeout_ms: int = Field(
        5_000, gt=0, description="How long producing may wait for the broker before the API answers 503."
    )
