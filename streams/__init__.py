"""streams: Kafka in, validated TicketRecord batches out (bad records to the dead-letter topic)."""

from streams.config import KafkaSettings
from streams.ingest import Ingester, IngestStats, RecordSink, ensure_topics
from streams.records import Rejection, TicketRecord, parse_ticket

__all__ = [
    "IngestStats",
    "Ingester",
    "KafkaSettings",
    "RecordSink",
    "Rejection",
    "TicketRecord",
    "ensure_topics",
    "parse_ticket",
]
