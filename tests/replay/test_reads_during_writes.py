"""Reads are answered while a large batch is written: embedding, the slow part of a write, runs
outside the buffer's lock (issue 13: `GET /v1/buffer` stalled 12.4 s during heavy ingest)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from replay.buffer import ReplayBuffer
from replay.embed import SentenceEmbedder
from streams.records import TicketRecord


class HeldEmbedder:
    """The real embedder, held at the start of `encode` until the test lets it go on."""

    def __init__(self, real: SentenceEmbedder) -> None:
        self.real, self.dim = real, real.dim
        self.entered, self.go_on = threading.Event(), threading.Event()

    def encode(self, texts: list[str]) -> np.ndarray:
        self.entered.set()
        self.go_on.wait(30)
        return self.real.encode(texts)


def test_reads_answer_while_a_batch_is_embedded(embedder: SentenceEmbedder, tmp_path: Path) -> None:
    held = HeldEmbedder(embedder)
    buffer = ReplayBuffer(tmp_path, held)  # type: ignore[arg-type]
    held.go_on.set()
    buffer.add_many([TicketRecord(id="old", text="where is my card", label="card_arrival")])
    held.go_on.clear()
    batch = [TicketRecord(id=f"t{i}", text=f"ticket number {i}", label="exchange_rate") for i in range(200)]
    writer = threading.Thread(target=buffer.add_many, args=(batch,))
    writer.start()
    try:
        assert held.entered.wait(10)
        answers: list[object] = []
        reader = threading.Thread(target=lambda: answers.extend(
            [buffer.label_counts(), buffer.pending(), len(buffer), buffer.windows()]))
        reader.start()
        reader.join(5)
        assert answers[:3] == [{"card_arrival": 1}, 1, 1], "a read waited for the write's embedding"
    finally:
        held.go_on.set()
        writer.join(60)
    assert len(buffer) == 201 and buffer.label_counts() == {"card_arrival": 1, "exchange_rate": 200}
    buffer.add_many(batch)  # a redelivery stores nothing twice
    assert len(buffer) == 201
