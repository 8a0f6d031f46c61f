"""The official `openai` client against the real server: chat and completions, plain and streamed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import openai
import pytest

from replay.buffer import is_probe
from service.settings import ServingSettings, Settings
from streams.records import TicketRecord
from tests.conftest import TINY_TRAIN, LiveService, tiny_settings, wait_for


def test_openai_client_chat_completions_and_models(serve: Callable[[Settings], LiveService],
                                                   tmp_path: Path) -> None:
    live = serve(tiny_settings(tmp_path, None, serving=ServingSettings(max_tokens=12, default_max_tokens=6)))
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="evergreen-dev-admin-key", max_retries=0)
    messages = [{"role": "system", "content": "You help with banking tickets."},
                {"role": "user", "content": "Where is my new card?"}]

    plain = client.chat.completions.create(model="live", messages=messages, max_tokens=8, temperature=0)
    assert plain.model == "v0000" and plain.object == "chat.completion"
    assert plain.choices[0].message.role == "assistant"
    assert plain.choices[0].finish_reason in ("stop", "length")
    assert 0 < plain.usage.completion_tokens <= 8 and plain.usage.prompt_tokens > 10

    # Streaming gives the same greedy text, chunk by chunk, from the same version.
    chunks = list(client.chat.completions.create(model="v0000", messages=messages, max_tokens=8,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert {c.model for c in chunks} == {"v0000"}
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == plain.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens

    # A stop string ends the answer and is never shown, streamed or not.
    cut = plain.choices[0].message.content[2:5]
    if cut.strip():
        stopped = client.chat.completions.create(model="live", messages=messages, max_tokens=8,
                                                 temperature=0, stop=[cut])
        assert stopped.choices[0].finish_reason == "stop"
        assert cut not in stopped.choices[0].message.content
        assert plain.choices[0].message.content.startswith(stopped.choices[0].message.content)

    completion = client.completions.create(model="live", prompt="Ticket: card lost\nIntent:", max_tokens=4,
                                           temperature=0)
    assert completion.model == "v0000" and completion.usage.completion_tokens <= 4
    pieces = list(client.completions.create(model="live", prompt="Ticket: card lost\nIntent:",
                                            max_tokens=4, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == completion.choices[0].text
    sampled = client.completions.create(model="live", prompt="Hello", max_tokens=4, temperature=0.8,
                                        top_p=0.9, seed=3)
    assert sampled.usage.completion_tokens <= 4

    models = client.models.list()
    assert [m.id for m in models.data] == ["live", "v0000"]
    assert client.models.retrieve("v0000").id == "v0000"

    with pytest.raises(openai.NotFoundError, match="unknown model 'v0042'"):
        client.chat.completions.create(model="v0042", messages=messages)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    with pytest.raises(openai.BadRequestError, match="at most 12"):
        client.chat.completions.create(model="live", messages=messages, max_tokens=13)
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="live", messages=[])

    raw = live.client().post("/v1/completions", json={"model": "live", "prompt": "Hi", "max_tokens": 2})
    assert raw.headers["x-evergreen-adapter-version"] == "v0000"


REPLIES = {"card_arrival": "Your card ships today.", "exchange_rate": "Rates change every hour."}


def test_a_promoted_windows_reply_comes_back_through_the_openai_client(serve: Callable[[Settings], LiveService],
                                                                       tmp_path: Path) -> None:
    """Replies are learned in the chat format the endpoint asks in (issue 14)."""
    system = "You answer the bank's support tickets."
    live = serve(tiny_settings(tmp_path, None, train=TINY_TRAIN.model_copy(update={"system_prompt": system})))
    labels = list(REPLIES)
    tickets = [TicketRecord(id=f"t{i}", text=f"my {('card', 'rate')[i % 2]} issue {i}", label=labels[i % 2],
                            reply=REPLIES[labels[i % 2]]) for i in range(40)]
    live.service.buffer.add_many(tickets)
    record = live.service.updates.start("manual")
    wait_for(lambda: record.finished_at is not None, 180, "the update")
    assert record.status == "promoted", record.reason

    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="evergreen-dev-admin-key", max_retries=0)
    probe_percent = live.service.settings.replay.probe_percent
    trained = [next(t for t in tickets if t.label == label and not is_probe(t.id, probe_percent)) for label in labels]
    for ticket in trained:  # the tiny random model memorises its tickets' replies rather than generalising
        messages = [{"role": "user", "content": ticket.text}]  # the configured system prompt goes first
        plain = client.chat.completions.create(model="live", messages=messages, max_tokens=16, temperature=0)
        assert plain.model == record.version
        assert plain.choices[0].message.content == ticket.reply
        assert plain.choices[0].finish_reason == "stop"  # it learned to end its turn
        chunks = client.chat.completions.create(model="live", messages=messages, max_tokens=16, temperature=0,
                                                stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ticket.reply
