"""`POST /v1/tickets`: tickets in over HTTP, out to the Kafka topic (the ingester stores them).

The same validation as the ingester applies (`streams.records.parse_ticket`), so a ticket the
API accepts is never dead-lettered; a bad one is a 422 naming the ticket and the reason, in
FastAPI's validation-error shape like every other 422.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Body, Depends, HTTPException, status
from fastapi.exceptions import RequestValidationError
from kafka.errors import KafkaError
from pydantic import BaseModel, ConfigDict, Field

from service.core import NoBroker
from service.deps import ServiceDep, require
from service.errors import responses
from streams.records import MAX_TURNS, Rejection, Turn, parse_ticket

LOG = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["tickets"])
IngestDep = Annotated[None, Depends(require("ingest"))]
NOT_BLANK = r"\S"  # as the ingester requires: not only whitespace


class TicketIn(BaseModel):
    """One ticket as a producer sends it (the `TicketRecord` contract)."""

    model_config = ConfigDict(extra="allow")  # unknown fields: refused only in `kafka.strict` mode

    id: str = Field(min_length=1, max_length=256, pattern=NOT_BLANK,
                    description="Idempotency key: resending never duplicates.")
    text: str = Field(min_length=1, pattern=NOT_BLANK,
                      description="The ticket text (at most `kafka.max_text_bytes` bytes).")
    label: str | None = Field(None, min_length=1, max_length=128, description="Intent or queue, if known.")
    reply: str | None = Field(None, description="The agent's resolution, if any.")
    messages: list[Turn] | None = Field(
        None, min_length=2, max_length=MAX_TURNS,
        description="A whole conversation instead of `reply`: an optional system message, then the user's and "
                    "the assistant's messages in turn, ending with the assistant's. Replies are learned from it.")
    created_at: datetime | None = None
    tags: list[str] = Field(default_factory=list)


class TicketsAccepted(BaseModel):
    accepted: int = Field(description="Tickets acknowledged by the broker.")
    ids: list[str]
    topic: str


UNCONFIRMED = ("the broker did not acknowledge every ticket in time (`kafka.produce_timeout_ms`); some may still "
               "be stored: resend the same tickets, a resent `id` is stored once")


def _invalid(loc: tuple[str | int, ...], message: str) -> RequestValidationError:
    """A 422 in the shape FastAPI gives its own validation errors (`detail`: a list)."""
    return RequestValidationError([{"type": "value_error", "loc": ("body", *loc), "msg": message, "input": None}])


@router.post("/tickets", status_code=status.HTTP_202_ACCEPTED,
             responses=responses(400, 401, 403, 409, 413, 503, descriptions={
                 400: "The body is not valid JSON.",
                 409: "This instance has no Kafka broker.",
                 503: "Not acknowledged in time: " + UNCONFIRMED + "."}))
def post_tickets(*, body: Annotated[TicketIn | Annotated[list[TicketIn], Field(min_length=1)], Body()],
                 service: ServiceDep, _: IngestDep) -> TicketsAccepted:
    """Produce one ticket or a batch (at most `kafka.max_request_tickets`) to the ticket topic
    (`ingest` scope). 202 once the broker acknowledged every one; they are searchable after the
    ingester stored them. A 503 comes within `kafka.produce_timeout_ms`, and its tickets may
    still be stored: resending them is safe (a ticket's `id` is its idempotency key)."""
    deadline = time.monotonic() + service.settings.kafka.produce_timeout_ms / 1000
    k = service.settings.kafka
    tickets = body if isinstance(body, list) else [body]
    if len(tickets) > k.max_request_tickets:
        raise _invalid((), f"send between 1 and {k.max_request_tickets} tickets (`kafka.max_request_tickets`)")
    values: list[bytes] = []
    for i, ticket in enumerate(tickets):
        value = json.dumps(ticket.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
                           | {"id": ticket.id, "text": ticket.text}).encode("utf-8")
        parsed = parse_ticket(value, max_text_bytes=k.max_text_bytes, max_message_bytes=k.max_message_bytes,
                              strict=k.strict)
        if isinstance(parsed, Rejection):
            where: tuple[str | int, ...] = (i,) if isinstance(body, list) else ()
            raise _invalid(where, f"ticket {i} (`{ticket.id}`): {parsed.reason}: {parsed.detail}")
        values.append(value)
    try:
        producer = service.ticket_producer(deadline)
        producer.send_confirmed(values, timeout_s=max(deadline - time.monotonic(), 0.001))
    except NoBroker as exc:  # a lasting state of this instance, not a transient outage
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
    except KafkaError as exc:
        LOG.warning("producing %d tickets failed: %s", len(values), exc)
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"{UNCONFIRMED} ({exc})",
                            headers={"Retry-After": "5"}) from exc
    return TicketsAccepted(accepted=len(values), ids=[t.id for t in tickets], topic=k.topic)
