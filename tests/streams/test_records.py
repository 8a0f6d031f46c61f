from __future__ import annotations

import json

import pytest

from streams.records import Rejection, TicketRecord, parse_ticket

LIMITS = dict(max_text_bytes=64, max_message_bytes=512)


@pytest.mark.parametrize(("value", "reason"), [
    (b"\xff\xfe not utf-8", "invalid_utf8"),
    (b"{not json", "not_json"),
    (b"[1, 2]", "not_object"),
    (b'{"text": "no id"}', "invalid_fields"),
    (b'{"id": "", "text": "empty id"}', "invalid_fields"),
    (b'{"id": "1", "text": "   "}', "invalid_fields"),
    (b'{"id": 7, "text": "id is a number"}', "invalid_fields"),
    (b'{"id": "1", "text": "ok", "label": 3}', "invalid_fields"),
    (json.dumps({"id": "1", "text": "x" * 65}).encode(), "text_too_large"),
    (json.dumps({"id": "1", "text": "é" * 33}).encode(), "text_too_large"),  # 66 UTF-8 bytes
    (b"{" + b" " * 600 + b"}", "message_too_large"),
    (None, "empty"),
    (b'{"id": "1", "text": "ok", "messages": "hello"}', "invalid_messages"),
    (b'{"id": "1", "text": "ok", "messages": [{"role": "user", "content": "ok"}]}', "invalid_messages"),
    (b'{"id": "1", "text": "ok", "messages": [{"role": "bot", "content": "ok"}]}', "invalid_messages"),
    (b'{"id": "1", "text": "ok", "messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}',
     "invalid_messages"),
])
def test_bad_messages_are_rejected_with_their_reason(value: bytes | None, reason: str) -> None:
    result = parse_ticket(value, **LIMITS)
    assert isinstance(result, Rejection)
    assert result.reason == reason
    assert result.detail


def test_valid_ticket_keeps_every_field() -> None:
    value = json.dumps({"id": "t-1", "text": "card?", "label": "card_arrival", "reply": "soon",
                        "created_at": "2026-11-28T10:00:00Z", "tags": ["vip"]}).encode()
    record = parse_ticket(value, **LIMITS)
    assert isinstance(record, TicketRecord)
    assert (record.id, record.label, record.reply, record.tags) == ("t-1", "card_arrival", "soon", ("vip",))
    assert record.created_at is not None and record.created_at.year == 2026


def test_unknown_fields_pass_unless_strict() -> None:
    value = b'{"id": "1", "text": "hi", "priority": "high"}'
    assert isinstance(parse_ticket(value, **LIMITS), TicketRecord)
    strict = parse_ticket(value, **LIMITS, strict=True)
    assert isinstance(strict, Rejection) and strict.reason == "unknown_fields"
    assert "priority" in strict.detail



@pytest.mark.parametrize(("messages", "why"), [
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}],
     "must alternate"),
    ([{"role": "assistant", "content": "a"}], "must alternate"),
    ([{"role": "user", "content": "a"}], "must end with the assistant"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}], "blank"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}] * 17, "at most 32"),
])
def test_a_malformed_conversation_is_refused_with_what_is_wrong(messages: list[dict[str, str]], why: str) -> None:
    result = parse_ticket(json.dumps({"id": "1", "text": "a", "messages": messages}).encode(),
                          max_text_bytes=64, max_message_bytes=4096)
    assert isinstance(result, Rejection) and result.reason == "invalid_messages" and why in result.detail


def test_a_conversation_is_kept_and_read_as_chat_messages() -> None:
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "card?"},
             {"role": "assistant", "content": "soon"}, {"role": "user", "content": "pin?"},
             {"role": "assistant", "content": "by post"}]
    record = parse_ticket(json.dumps({"id": "t", "text": "card?", "messages": turns}).encode(), **LIMITS)
    assert isinstance(record, TicketRecord) and record.conversation() == turns
    both = parse_ticket(json.dumps({"id": "t", "text": "card?", "reply": "soon", "messages": turns}).encode(),
                        max_text_bytes=64, max_message_bytes=4096)
    assert isinstance(both, Rejection) and "either `reply` or `messages`" in both.detail
