"""The replay buffer: ticket rows in SQLite, their embeddings in a FAISS inner-product index.

SQLite is the source of truth (each row keeps its embedding); the FAISS index is derived from
it, saved on close and rebuilt on open when it does not match the rows, so a crash at any
moment loses neither rows nor the index.
"""

from __future__ import annotations

import hashlib
import logging
import random
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from replay.embed import Embedder
from streams.records import TicketRecord

LOG = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS windows (
    id INTEGER PRIMARY KEY,
    opened_at REAL NOT NULL,
    closed_at REAL
);
CREATE TABLE IF NOT EXISTS records (
    row INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    text TEXT NOT NULL,
    label TEXT,
    reply TEXT,
    window INTEGER NOT NULL REFERENCES windows(id),
    probe INTEGER NOT NULL,
    added_at REAL NOT NULL,
    embedding BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS records_window ON records(window, probe);
"""


def is_probe(ticket_id: str, probe_percent: int) -> bool:
    """Deterministic held-out split: the same id is always on the same side.

    Examples
    --------
    >>> is_probe("ticket-1", 20) == is_probe("ticket-1", 20)
    True
    """
    digest = hashlib.sha256(ticket_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 100 < probe_percent


@dataclass(frozen=True)
class WindowInfo:
    id: int
    closed: bool
    train_size: int
    probe_size: int
    labels: tuple[str, ...]


@dataclass(frozen=True)
class Snapshot:
    """What one update trains and is judged on; taken from the buffer, read by the learner."""

    new_windows: tuple[int, ...]  # windows not yet trained into the live adapter
    new: list[TicketRecord]  # their training rows
    replay: list[TicketRecord]  # a sample of training rows from windows already trained
    probes: dict[int, list[TicketRecord]]  # held-out rows of every closed window
    labels: tuple[str, ...]  # every label seen in closed windows, sorted


class ReplayBuffer:
    """Durable, idempotent store of tickets, grouped into windows, searchable by meaning.

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> class Letters:  # a toy embedder: one dimension per first letter
    ...     dim = 26
    ...     def encode(self, texts):
    ...         v = np.zeros((len(texts), 26), np.float32)
    ...         for i, t in enumerate(texts): v[i, ord(t[0]) - 97] = 1
    ...         return v
    >>> buf = ReplayBuffer(Path(tempfile.mkdtemp()), Letters())
    >>> buf.add_many([TicketRecord(id="1", text="card lost", label="lost"),
    ...               TicketRecord(id="1", text="card lost", label="lost")])
    >>> len(buf)
    1
    >>> buf.search("car", k=1)[0][0].id
    '1'
    """

    def __init__(self, directory: Path, embedder: Embedder, probe_percent: int = 20) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.embedder = embedder
        self.probe_percent = probe_percent
        self._index_path = directory / "buffer.faiss"
        self._lock = threading.RLock()
        self._db = sqlite3.connect(directory / "buffer.sqlite3", check_same_thread=False,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a committed batch survives power loss
        self._db.executescript(_SCHEMA)
        if self._db.execute("SELECT COUNT(*) FROM windows WHERE closed_at IS NULL").fetchone()[0] == 0:
            self._db.execute("INSERT INTO windows(opened_at) VALUES (?)", (time.time(),))
        self._index = self._load_index()

    # -- index ------------------------------------------------------------------------------
    def _load_index(self) -> faiss.IndexIDMap2:
        rows = self._db.execute("SELECT COUNT(*), COALESCE(MAX(row), 0) FROM records").fetchone()
        if self._index_path.exists():
            index = faiss.read_index(str(self._index_path))
            if index.ntotal == rows[0] and (rows[0] == 0 or index.id_map.at(index.ntotal - 1) == rows[1]):
                return index
            LOG.warning("FAISS index does not match the rows (%d vs %d): rebuilding", index.ntotal, rows[0])
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.embedder.dim))
        for ids, vectors in self._embedding_blocks():
            index.add_with_ids(vectors, ids)
        return index

    def _embedding_blocks(self, block: int = 10_000) -> Iterable[tuple[np.ndarray, np.ndarray]]:
        """Stored embeddings in blocks of `block` rows, so a rebuild never holds them all twice."""
        last = 0
        while True:
            rows = self._db.execute(
                "SELECT row, embedding FROM records WHERE row > ? ORDER BY row LIMIT ?", (last, block)
            ).fetchall()
            if not rows:
                return
            ids = np.array([r[0] for r in rows], dtype=np.int64)
            vectors = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32)
            yield ids, vectors.reshape(len(rows), self.embedder.dim)
            last = int(ids[-1])

    def save(self) -> None:
        """Write the index next to the rows (atomically: temporary file, then rename)."""
        with self._lock:
            tmp = self._index_path.with_suffix(".tmp")
            faiss.write_index(self._index, str(tmp))
            tmp.replace(self._index_path)

    def close(self) -> None:
        with self._lock:
            self.save()
            self._db.close()

    # -- writing ----------------------------------------------------------------------------
    def add_many(self, records: Sequence[TicketRecord]) -> None:
        """Store records in the open window; ids already stored are skipped. Durable on return."""
        with self._lock:
            unique = {r.id: r for r in records}
            known = {row[0] for chunk in _chunks(list(unique), 500) for row in self._db.execute(
                f"SELECT id FROM records WHERE id IN ({','.join('?' * len(chunk))})", chunk)}
            fresh = [r for r in unique.values() if r.id not in known]
            if not fresh:
                return
            vectors = self.embedder.encode([r.text for r in fresh])
            window = self.open_window()
            now = time.time()
            self._db.execute("BEGIN IMMEDIATE")
            try:
                rows = [
                    self._db.execute(
                        "INSERT INTO records(id, text, label, reply, window, probe, added_at, embedding)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (r.id, r.text, r.label, r.reply, window,
                         is_probe(r.id, self.probe_percent), now, vector.tobytes()),
                    ).lastrowid
                    for r, vector in zip(fresh, vectors, strict=True)
                ]
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._index.add_with_ids(vectors, np.array(rows, dtype=np.int64))

    def close_window(self) -> int | None:
        """Close the open window if it holds records and open the next; returns the closed id."""
        with self._lock:
            window = self.open_window()
            if self._db.execute("SELECT 1 FROM records WHERE window = ? LIMIT 1", (window,)).fetchone() is None:
                return None
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("UPDATE windows SET closed_at = ? WHERE id = ?", (time.time(), window))
            self._db.execute("INSERT INTO windows(opened_at) VALUES (?)", (time.time(),))
            self._db.execute("COMMIT")
            return window

    # -- reading ----------------------------------------------------------------------------
    def __len__(self) -> int:
        with self._lock:
            count: int = self._db.execute("SELECT COUNT(*) FROM records").fetchone()[0]
            return count

    def open_window(self) -> int:
        with self._lock:
            window: int = self._db.execute(
                "SELECT id FROM windows WHERE closed_at IS NULL ORDER BY id DESC LIMIT 1").fetchone()[0]
            return window

    def pending(self) -> int:
        """Records in the open window: what the next update would learn."""
        with self._lock:
            count: int = self._db.execute(
                "SELECT COUNT(*) FROM records WHERE window = ?", (self.open_window(),)).fetchone()[0]
            return count

    def windows(self) -> list[WindowInfo]:
        with self._lock:
            rows = self._db.execute(
                "SELECT w.id, w.closed_at IS NOT NULL,"
                " SUM(CASE WHEN r.probe = 0 THEN 1 ELSE 0 END), SUM(r.probe),"
                " GROUP_CONCAT(DISTINCT r.label)"
                " FROM windows w LEFT JOIN records r ON r.window = w.id GROUP BY w.id ORDER BY w.id"
            ).fetchall()
        return [WindowInfo(w, bool(closed), train or 0, probe or 0,
                           tuple(sorted(labels.split(","))) if labels else ())
                for w, closed, train, probe, labels in rows]

    def records(self, windows: Iterable[int], *, probe: bool) -> list[TicketRecord]:
        """Rows of the given windows, the probe side or the training side, in arrival order."""
        wanted = list(windows)
        if not wanted:
            return []
        with self._lock:
            rows = self._db.execute(
                f"SELECT id, text, label, reply FROM records WHERE probe = ? AND window IN"
                f" ({','.join('?' * len(wanted))}) ORDER BY row", (int(probe), *wanted)).fetchall()
        return [_record(row) for row in rows]

    def sample(self, k: int, windows: Iterable[int], *, seed: int | None = None) -> list[TicketRecord]:
        """Up to k training rows drawn uniformly without replacement from the given windows."""
        pool = self.records(windows, probe=False)
        return random.Random(seed).sample(pool, min(k, len(pool)))

    def search(self, text: str, k: int = 5) -> list[tuple[TicketRecord, float]]:
        """The k stored tickets nearest in meaning to `text`, with cosine similarity."""
        vector = self.embedder.encode([text])
        with self._lock:
            scores, ids = self._index.search(vector, k)
            found = [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0]
            rows = {row[0]: row[1:] for row in self._db.execute(
                f"SELECT row, id, text, label, reply FROM records WHERE row IN"
                f" ({','.join('?' * len(found))})", [i for i, _ in found])} if found else {}
        return [(_record(rows[i]), score) for i, score in found if i in rows]

    def snapshot(self, trained_windows: Iterable[int], seed: int) -> Snapshot:
        """Training material for one update: every closed window not yet trained is new, and
        as many replay rows as new rows are drawn from the windows already trained."""
        trained = set(trained_windows)
        closed = [w for w in self.windows() if w.closed]
        new_windows = tuple(w.id for w in closed if w.id not in trained)
        new = self.records(new_windows, probe=False)
        return Snapshot(
            new_windows=new_windows,
            new=new,
            replay=self.sample(len(new), [w.id for w in closed if w.id in trained], seed=seed),
            probes={w.id: self.records([w.id], probe=True) for w in closed},
            labels=tuple(sorted({label for w in closed for label in w.labels})),
        )


def _record(row: Sequence[str | None]) -> TicketRecord:
    ticket_id, text, label, reply = row
    assert ticket_id is not None and text is not None
    return TicketRecord(id=ticket_id, text=text, label=label, reply=reply)


def _chunks(items: list[str], size: int) -> Iterable[list[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
