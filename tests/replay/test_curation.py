"""Curation before storage: PII redaction with counts, near-duplicates, the mislabel flag."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from replay.buffer import ReplayBuffer
from replay.config import ReplaySettings
from replay.curate import iban_valid, luhn_valid, redact
from replay.embed import SentenceEmbedder
from streams.datasets import load_tickets
from streams.records import TicketRecord, Turn


def on_disk(directory: Path, query: str) -> list[tuple[object, ...]]:
    """What a buffer's SQLite file holds, read as anyone with the file could (read-only)."""
    with closing(sqlite3.connect(f"file:{directory / 'buffer.sqlite3'}?mode=ro", uri=True)) as db:
        return db.execute(query).fetchall()


@pytest.mark.parametrize(("text", "redacted", "counts"), [
    ("write to anna.k+bank@example.co.uk today", "write to [EMAIL] today", {"email": 1}),
    ("card 4539 1488 0343 6467 was charged twice", "card [CARD] was charged twice", {"card": 1}),
    ("card 4539-1488-0343-6467", "card [CARD]", {"card": 1}),
    ("my number 5500005555555559 and 4111111111111111", "my number [CARD] and [CARD]", {"card": 2}),
    ("IBAN GB82 WEST 1234 5698 7654 32 please", "IBAN [IBAN] please", {"iban": 1}),
    ("send it to DE89370400440532013000", "send it to [IBAN]", {"iban": 1}),
    ("call +44 20 7946 0958 or (555) 123-4567", "call [PHONE] or [PHONE]", {"phone": 2}),
    ("ring me on 07700 900123", "ring me on [PHONE]", {"phone": 1}),
    # Numbers that are not PII stay: a failing Luhn or IBAN check, amounts, dates, short ids.
    ("card 4539 1488 0343 6468 failed", "card 4539 1488 0343 6468 failed", {}),
    ("IBAN GB82 WEST 1234 5698 7654 33", "IBAN GB82 WEST 1234 5698 7654 33", {}),
    ("I paid 1500 pounds on 12.03.2024 for order 123456", "I paid 1500 pounds on 12.03.2024 for order 123456", {}),
])
def test_redaction(text: str, redacted: str, counts: dict[str, int]) -> None:
    out, found = redact(text)
    assert out == redacted
    assert dict(found) == counts


def test_checksums() -> None:
    assert luhn_valid("79927398713") and not luhn_valid("79927398710")
    assert iban_valid("FR1420041010050500013M02606") and not iban_valid("FR1420041010050500013M02607")


def test_buffer_stores_only_redacted_text_and_counts(tmp_path: Path, embedder: SentenceEmbedder) -> None:
    buffer = ReplayBuffer(tmp_path, embedder)
    buffer.add_many([TicketRecord(id="1", text="I am jo@example.com, card 4111 1111 1111 1111",
                                  reply="We emailed jo@example.com")])
    stored = buffer.search("card", k=1)[0][0]
    assert stored.text == "I am [EMAIL], card [CARD]" and stored.reply == "We emailed [EMAIL]"
    assert buffer.stats["redacted_email"] == 2 and buffer.stats["redacted_card"] == 1
    raw = on_disk(tmp_path, "SELECT group_concat(text || coalesce(reply, '')) FROM records")[0][0]
    assert "example.com" not in raw and "4111" not in raw


def test_near_duplicates_are_skipped_but_remembered(tmp_path: Path, embedder: SentenceEmbedder) -> None:
    buffer = ReplayBuffer(tmp_path, embedder, settings=ReplaySettings(near_duplicate_cosine=0.95))
    buffer.add_many([TicketRecord(id="a", text="My card has not arrived yet"),
                     TicketRecord(id="b", text="My card has not arrived yet!"),  # same batch
                     TicketRecord(id="c", text="What is the exchange rate for euros?")])
    buffer.add_many([TicketRecord(id="d", text="my card has not arrived yet")])  # a later batch
    assert len(buffer) == 2 and buffer.stats["near_duplicate"] == 2
    # The skipped ids stay idempotent: redelivered, even with other texts, none is stored.
    others = ["How do I reset my password?", "Can I change my delivery address?",
              "Why was I charged twice?", "Please close my account."]
    buffer.add_many([TicketRecord(id=i, text=text) for i, text in zip("abcd", others, strict=True)])
    assert len(buffer) == 2 and buffer.stats["near_duplicate"] == 2
    skipped = dict(on_disk(tmp_path, "SELECT id, duplicate_of FROM skipped"))
    assert skipped == {"b": "a", "d": "a"}


def test_a_ticket_whose_neighbours_agree_on_another_label_is_flagged(
        tmp_path: Path, embedder: SentenceEmbedder) -> None:
    buffer = ReplayBuffer(tmp_path, embedder)
    buffer.add_many([TicketRecord(id=f"c{i}", text=text, label="card_arrival") for i, text in enumerate([
        "My card has not arrived", "When will my new card arrive?", "Still waiting for my card",
        "The card you sent never came", "How long does card delivery take?"])])
    buffer.close_window()
    buffer.add_many([TicketRecord(id="wrong", text="my card still hasn't been delivered", label="exchange_rate"),
                     TicketRecord(id="right", text="my card has not come in the post", label="card_arrival")])
    window = buffer.close_window()  # the vote is taken when the window closes
    suspects = {row[0] for row in on_disk(tmp_path, "SELECT id FROM records WHERE suspect = 1")}
    assert suspects == {"wrong"} and buffer.stats["suspect"] == 1
    assert window is not None
    # Likely mislabels are kept (visible, countable) but never replayed.
    assert "wrong" not in {r.id for r in buffer.sample(100, [window], seed=0)}


def test_a_new_intent_close_to_an_earlier_one_is_not_flagged(tmp_path: Path, embedder: SentenceEmbedder) -> None:
    """A new intent's tickets arrive with only earlier intents for neighbours; voted at ingest, the
    whole window was flagged as mislabelled, never replayed, and forgotten at the next update."""
    buffer = ReplayBuffer(tmp_path, embedder)
    buffer.add_many([TicketRecord(id=f"a{i}", text=text, label="card_arrival") for i, text in enumerate([
        "My card has not arrived", "When will my new card arrive?", "Still waiting for my card",
        "The card you sent never came", "How long does card delivery take?", "my card is not here yet"])])
    buffer.close_window()
    buffer.add_many([TicketRecord(id=f"t{i}", text=text, label="card_tracking") for i, text in enumerate([
        "Can I track my card's delivery?", "Is there a tracking number for my card?",
        "How do I track the card you sent?", "Where can I see where my card is in the post?",
        "Track my card delivery please", "I want to follow my card's shipment"])])
    assert buffer.stats["suspect"] == 0  # nothing is judged while the window is open
    window = buffer.close_window()
    assert window is not None
    replayable = buffer.sample(100, [window], seed=0)
    assert replayable and {r.label for r in replayable} == {"card_tracking"}
    assert len(replayable) == len(buffer.records([window], probe=False)) and buffer.stats["suspect"] == 0


def test_one_merged_write_decides_as_record_by_record(tmp_path: Path, embedder: SentenceEmbedder) -> None:
    """A backlog reaches the buffer as one large write (`kafka.write_batch_records`); what is
    stored, skipped as a near-duplicate (and of which ticket), redacted and flagged must not
    depend on how the stream was cut into writes."""
    by_label: dict[str, list[TicketRecord]] = {}
    for t in load_tickets("banking77", "train"):
        by_label.setdefault(str(t.label), []).append(t)
    labels = sorted(by_label, key=lambda label: -len(by_label[label]))[:4]
    tickets = [t for label in labels for t in by_label[label][:15]]
    stream = [*tickets,
              *(t.model_copy(update={"id": f"{t.id}-again", "text": t.text.lower() + "!"}) for t in tickets[::10]),
              *(t.model_copy(update={"label": labels[(i + 1) % 4]}) for i, label in enumerate(labels)
                for t in by_label[label][15:17]),  # mislabelled: another of the four labels
              TicketRecord(id="pii", text="card 4111 1111 1111 1111 never arrived, mail jo@example.com")]
    settings = ReplaySettings(near_duplicate_cosine=0.95)
    merged, single = tmp_path / "merged", tmp_path / "single"
    ReplayBuffer(merged, embedder, settings=settings).add_many(stream)
    one_by_one = ReplayBuffer(single, embedder, settings=settings)
    for ticket in stream:
        one_by_one.add_many([ticket])
    for directory in (merged, single):
        assert ReplayBuffer(directory, embedder, settings=settings).close_window() is not None

    def verdicts(directory: Path) -> tuple[list[tuple[object, ...]], ...]:
        return (on_disk(directory, "SELECT id, text, probe, suspect FROM records ORDER BY id"),
                on_disk(directory, "SELECT id, reason, duplicate_of FROM skipped ORDER BY id"))

    stored, skipped = verdicts(merged)
    assert len(skipped) >= 5 and any(suspect for *_, suspect in stored)  # the cases are exercised
    assert (stored, skipped) == verdicts(single)


def test_a_conversation_is_stored_redacted_and_read_back_whole(tmp_path: Path, embedder: SentenceEmbedder) -> None:
    turns = (Turn(role="user", content="Card 4111 1111 1111 1111 never came"),
             Turn(role="assistant", content="We will write to jo@example.com"),
             Turn(role="user", content="Thanks"), Turn(role="assistant", content="You are welcome."))
    buffer = ReplayBuffer(tmp_path, embedder)
    buffer.add_many([TicketRecord(id="c", text="Card 4111 1111 1111 1111 never came", messages=turns)])
    buffer.close()
    stored = ReplayBuffer(tmp_path, embedder).search("card", k=1)[0][0]
    assert [turn["content"] for turn in stored.conversation() or []] == [
        "Card [CARD] never came", "We will write to [EMAIL]", "Thanks", "You are welcome."]
    raw = on_disk(tmp_path, "SELECT messages FROM records")[0][0]
    assert "example.com" not in raw and "4111" not in raw

