"""Label shortlists from a ticket's nearest labelled neighbours (real MiniLM, real FAISS index)."""

from __future__ import annotations

from pathlib import Path

from replay.buffer import ReplayBuffer, is_probe
from replay.embed import SentenceEmbedder
from replay.shortlist import shortlist
from streams.records import TicketRecord

TOPICS = {
    "card_arrival": ["my new card has not arrived yet", "when will my card be delivered",
                     "card still not in the post after two weeks"],
    "exchange_rate": ["what is the euro to dollar exchange rate", "which rate do you use to convert pounds",
                      "how much is one dollar in yen today"],
    "pin_blocked": ["my pin is blocked after three tries", "i typed the wrong pin and now it is locked",
                    "how do i unblock my pin"],
    "top_up_failed": ["my top up did not go through", "adding money to my account failed",
                      "the top up was declined"],
}
ALLOWED = sorted(TOPICS)


def filled(tmp_path: Path, embedder: SentenceEmbedder, probe_percent: int = 0) -> ReplayBuffer:
    buffer = ReplayBuffer(tmp_path, embedder, probe_percent=probe_percent)
    buffer.add_many([TicketRecord(id=f"{label}-{i}", text=text, label=label)
                     for label, texts in TOPICS.items() for i, text in enumerate(texts)])
    buffer.add_many([TicketRecord(id="no-label", text="my card has not arrived, any news?")])
    return buffer


def test_the_shortlist_is_led_by_the_neighbours_label_and_has_a_fixed_size(tmp_path: Path,
                                                                           embedder: SentenceEmbedder) -> None:
    buffer = filled(tmp_path, embedder)
    [near] = buffer.neighbour_labels(["has my card been sent? it is not here"], k=5)
    assert len(near) == 5 and near[0][0] == "card_arrival"  # the unlabelled twin does not vote
    assert [cosine for _, cosine in near] == sorted((cosine for _, cosine in near), reverse=True)
    short = shortlist(near, ALLOWED, 3)
    assert short[0] == "card_arrival" and len(short) == 3 and len(set(short)) == 3
    # Only labels the version knows: card_arrival is not among them, the rest tops the list up.
    known = ["exchange_rate", "pin_blocked", "top_up_failed"]
    assert set(shortlist(near, known, 2)) <= set(known) and len(shortlist(near, known, 2)) == 2
    [rate] = buffer.neighbour_labels(["convert my dollars to euros, at what rate?"], k=3)
    assert shortlist(rate, ALLOWED, 1) == ["exchange_rate"]


def test_no_neighbour_means_no_shortlist(tmp_path: Path, embedder: SentenceEmbedder) -> None:
    empty = ReplayBuffer(tmp_path / "empty", embedder)
    assert empty.neighbour_labels(["where is my card"], k=5) == [[]]
    assert shortlist([], ALLOWED, 2) == []
    buffer = filled(tmp_path / "full", embedder)
    [near] = buffer.neighbour_labels(["where is my card"], k=5)
    assert shortlist(near, ["refund_request", "cash_fee"], 1) == []  # none of its labels is known


def test_probe_rows_can_be_kept_from_voting(tmp_path: Path, embedder: SentenceEmbedder) -> None:
    """The gate's case: a probe's own stored copy must not shortlist its true label."""
    buffer = filled(tmp_path, embedder, probe_percent=50)
    rows = [(f"{label}-{i}", text) for label, texts in TOPICS.items() for i, text in enumerate(texts)]
    probes = {text for ticket_id, text in rows if is_probe(ticket_id, 50)}
    assert 0 < len(probes) < len(rows)  # this split has both sides
    texts = [text for _, text in rows]
    everyone = buffer.neighbour_labels(texts, k=len(rows) + 1)  # every stored row
    training = buffer.neighbour_labels(texts, k=len(rows) + 1, probes=False)
    assert all(len(near) == len(rows) for near in everyone)
    assert all(len(near) == len(rows) - len(probes) for near in training)
    for text, near, kept in zip(texts, everyone, training, strict=True):
        assert near[0][1] > 0.99  # every ticket is stored: its nearest neighbour is itself
        assert (kept[0][1] > 0.99) == (text not in probes)  # ...unless it is a probe and probes do not vote


def test_a_stored_ticket_can_be_kept_from_voting_on_its_own_text(tmp_path: Path, embedder: SentenceEmbedder) -> None:
    """A hyperparameter search's case: a held-out training row gets the vote a new ticket like it
    would, from every other stored ticket but not from its own stored copy."""
    buffer = filled(tmp_path, embedder)
    ids = [f"{label}-{i}" for label, texts in TOPICS.items() for i in range(len(texts))]
    texts = [text for texts in TOPICS.values() for text in texts]
    everyone = buffer.neighbour_labels(texts, k=len(ids))
    others = buffer.neighbour_labels(texts, k=len(ids), left_out=ids)
    for near, rest in zip(everyone, others, strict=True):
        assert near[0][1] > 0.99 and len(near) == len(ids)  # its own copy first
        assert near[1:] == rest  # the same neighbours without it
