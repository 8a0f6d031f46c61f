"""The TicketRecord contract and the validation that splits a topic into records and rejects."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

MAX_TURNS = 32  # a conversation longer than this is not a support ticket


class Turn(BaseModel):
    """One message of a conversation, as chat APIs write it."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    role: Literal["system", "user", "assistant"]
    content: str = Field(min_length=1)


class TicketRecord(BaseModel):
    """One support ticket. `id` is the idempotency key: a redelivery never makes a second row.

    Examples
    --------
    >>> TicketRecord(id="t1", text="My card has not arrived", label="card_arrival").label
    'card_arrival'
    """

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)

    id: str = Field(min_length=1, max_length=256)
    text: str = Field(min_length=1)
    label: str | None = Field(None, min_length=1, max_length=128)
    reply: str | None = None
    messages: tuple[Turn, ...] | None = Field(None, strict=False)
    created_at: datetime | None = Field(None, strict=False)
    tags: tuple[str, ...] = Field((), strict=False)

    @field_validator("id", "text")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value

    @field_validator("messages")
    @classmethod
    def _a_conversation(cls, turns: tuple[Turn, ...] | None, info: ValidationInfo) -> tuple[Turn, ...] | None:
        """An optional system message, then user and assistant in turn, ending with the
        assistant's (what is learned); `reply` is the one-exchange form of the same thing."""
        if turns is None:
            return None
        if info.data.get("reply") is not None:
            raise ValueError("give either `reply` or `messages`, not both")
        if len(turns) > MAX_TURNS:
            raise ValueError(f"at most {MAX_TURNS} messages")
        roles = [t.role for t in turns]
        roles = roles[1:] if roles[:1] == ["system"] else roles
        if not roles or roles[-1] != "assistant":
            raise ValueError("must end with the assistant's message")
        if any(role != ("user", "assistant")[i % 2] for i, role in enumerate(roles)):
            raise ValueError("after an optional system message, user and assistant messages must alternate, "
                             "the user's first")
        if any(not t.content.strip() for t in turns):
            raise ValueError("no message may be blank")
        return turns

    def conversation(self) -> list[dict[str, str]] | None:
        """The exchange to learn a reply from, as chat messages: `messages`, or the ticket and its
        `reply`; None when the ticket carries neither.

        >>> TicketRecord(id="t1", text="Where is my card?", reply="It ships today.").conversation()
        [{'role': 'user', 'content': 'Where is my card?'}, {'role': 'assistant', 'content': 'It ships today.'}]
        """
        if self.messages is not None:
            return [turn.model_dump() for turn in self.messages]
        if self.reply is not None:
            return [{"role": "user", "content": self.text}, {"role": "assistant", "content": self.reply}]
        return None


@dataclass(frozen=True)
class Rejection:
    """Why a message could not become a TicketRecord; goes to the dead-letter topic."""

    reason: str  # short machine-readable code, the metric label
    detail: str  # human-readable explanation


_KNOWN_FIELDS = frozenset(TicketRecord.model_fields)


def parse_ticket(
    value: bytes | None, *, max_text_bytes: int, max_message_bytes: int, strict: bool = False
) -> TicketRecord | Rejection:
    """Validate one raw message value.

    Examples
    --------
    >>> parse_ticket(b'{"id": "1", "text": "hi"}', max_text_bytes=100, max_message_bytes=1000).id
    '1'
    >>> parse_ticket(b'not json', max_text_bytes=100, max_message_bytes=1000).reason
    'not_json'
    """
    if value is None:
        return Rejection("empty", "message has no value")
    if len(value) > max_message_bytes:
        return Rejection("message_too_large", f"message is {len(value)} bytes, limit {max_message_bytes}")
    try:
        decoded = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Rejection("invalid_utf8", str(exc))
    try:
        payload: Any = json.loads(decoded)
    except json.JSONDecodeError as exc:
        return Rejection("not_json", str(exc))
    if not isinstance(payload, dict):
        return Rejection("not_object", f"expected a JSON object, got {type(payload).__name__}")
    unknown = sorted(set(payload) - _KNOWN_FIELDS)
    if strict and unknown:
        return Rejection("unknown_fields", f"unknown fields: {', '.join(unknown)}")
    try:
        record = TicketRecord.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "record"
        reason = "invalid_messages" if first["loc"][:1] == ("messages",) else "invalid_fields"
        return Rejection(reason, f"`{field}`: {first['msg']}")
    if len(record.text.encode("utf-8")) > max_text_bytes:
        return Rejection("text_too_large", f"`text` is over {max_text_bytes} bytes")
    return record
