from __future__ import annotations

from collections import Counter
from pathlib import Path

from replay.buffer import ReplayBuffer, is_probe
from replay.embed import SentenceEmbedder
from replay.policy import probe_draw
from streams.records import TicketRecord


def tickets(prefix: str, labels: list[str], n: int) -> list[TicketRecord]:
    return [TicketRecord(id=f"{prefix}-{i}", text=f"ticket {i} about {labels[i % len(labels)]}",
                         label=labels[i % len(labels)]) for i in range(n)]


def test_windows_probes_and_snapshot(tmp_path: Path, embedder: SentenceEmbedder) -> None:
    buffer = ReplayBuffer(tmp_path, embedder, probe_percent=25)
    buffer.add_many(tickets("a", ["card_arrival", "exchange_rate"], 80))
    buffer.add_many(tickets("a", ["card_arrival", "exchange_rate"], 80))  # redelivery: no new rows
    assert len(buffer) == 80 and buffer.pending() == 80
    first = buffer.close_window()
    assert buffer.close_window() is None  # an empty window is never closed
    buffer.add_many(tickets("b", ["top_up_failed"], 20))
    second = buffer.close_window()
    assert first is not None and second is not None

    snapshot = buffer.snapshot(trained_windows=[first], seed=0)
    assert snapshot.new_windows == (second,)
    assert {r.label for r in snapshot.new} == {"top_up_failed"}
    assert snapshot.replay and {r.id[0] for r in snapshot.replay} == {"a"}
    # As many rows per earlier label as the new window has per new label, labels evenly drawn.
    assert len(snapshot.replay) == 2 * len(snapshot.new) < len(buffer.records([first], probe=False))
    replayed = Counter(r.label for r in snapshot.replay)
    assert replayed["card_arrival"] == replayed["exchange_rate"] == len(snapshot.new)
    assert set(snapshot.probes) == {first, second}
    assert snapshot.labels == ("card_arrival", "exchange_rate", "top_up_failed")
    probe_ids = {r.id for rows in snapshot.probes.values() for r in rows}
    train_ids = {r.id for r in snapshot.new} | {r.id for r in buffer.records([first], probe=False)}
    assert probe_ids and not probe_ids & train_ids  # probes are never trained on
    assert probe_ids == {f"{p}-{i}" for p, n in (("a", 80), ("b", 20)) for i in range(n)
                         if is_probe(f"{p}-{i}", 25)}


def test_every_label_keeps_a_training_row(tmp_path: Path, embedder: SentenceEmbedder) -> None:
    def ids(prefix: str, n: int, probe: bool) -> list[str]:  # the first n ids the hash puts on one side
        return [i for i in (f"{prefix}-{k}" for k in range(1000)) if is_probe(i, 20) == probe][:n]

    rare, pair, lone = ids("rare", 4, probe=False), ids("pair", 2, probe=True), ids("lone", 1, probe=True)
    buffer = ReplayBuffer(tmp_path, embedder, probe_percent=20)
    buffer.add_many([TicketRecord(id=i, text=f"ticket {i}", label=i.split("-")[0]) for i in rare + pair + lone])
    window = buffer.close_window()
    assert window is not None
    assert {r.id for r in buffer.records([window], probe=True)} == {min(pair, key=probe_draw)}  # nearest the line
    assert {r.label for r in buffer.records([window], probe=False)} == {"rare", "pair", "lone"}
    assert buffer.stats["moved_to_training"] == 2 and buffer.windows()[0].probe_size == 1


def test_search_finds_meaning(tmp_path: Path, embedder: SentenceEmbedder) -> None:
    buffer = ReplayBuffer(tmp_path, embedder)
    buffer.add_many([TicketRecord(id="1", text="My card never arrived in the post"),
                     TicketRecord(id="2", text="What is the euro to dollar exchange rate?")])
    (best, score), _ = buffer.search("when will my new card be delivered", k=2)
    assert best.id == "1" and 0 < score <= 1.0001


def test_reopen_rebuilds_an_index_that_lost_rows(tmp_path: Path, embedder: SentenceEmbedder) -> None:
    buffer = ReplayBuffer(tmp_path, embedder)
    buffer.add_many(tickets("a", ["x"], 10))
    buffer.close()  # index saved with 10 rows
    buffer = ReplayBuffer(tmp_path, embedder)
    buffer.add_many(tickets("b", ["y"], 5))
    del buffer  # a crash: rows committed, index never saved again
    reopened = ReplayBuffer(tmp_path, embedder)
    assert len(reopened) == 15
    assert reopened.index_state().vectors == 15
    assert reopened.search("ticket 3 about y", k=1)[0][0].id == "b-3"
