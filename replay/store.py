"""The buffer's SQLite side: every query, named rows, and the one transaction helper.

Each row keeps its ticket, window, probe side, eviction key, likely-mislabel flag and embedding
(float32 bytes; `vectors` decodes them). Reads return named records (`StoredRow`, `WindowInfo`);
writes that must land together run inside `transaction()`. The store does no locking: its owner,
the buffer, serialises the calls.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence, Sized
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, TypeVar

import numpy as np

from replay.schema import ADDED_COLUMNS, SCHEMA
from streams.records import TicketRecord, Turn

T = TypeVar("T")


class StoredRow(NamedTuple):
    """One stored ticket; `embedding` is None unless the query asked for it."""

    row: int
    id: str
    text: str
    label: str | None
    reply: str | None
    messages: str | None  # JSON
    key: float
    embedding: bytes | None

    def record(self) -> TicketRecord:
        turns = None if self.messages is None else tuple(Turn(**t) for t in json.loads(self.messages))
        return TicketRecord(id=self.id, text=self.text, label=self.label, reply=self.reply, messages=turns)


@dataclass(frozen=True)
class WindowInfo:
    id: int
    closed: bool
    train_size: int
    probe_size: int
    labels: tuple[str, ...]


class RowStore:
    """Rows, windows and skipped ids in one SQLite file (WAL, `synchronous=FULL`)."""

    def __init__(self, path: Path, dim: int) -> None:
        self.dim = dim
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # a committed batch survives power loss
        self.db.executescript(SCHEMA)
        for table, columns in ADDED_COLUMNS.items():
            present = {row[1] for row in self.db.execute(f"PRAGMA table_info({table})")}
            for column, kind in columns.items():
                if column not in present:
                    self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
        if self.db.execute("SELECT COUNT(*) FROM windows WHERE closed_at IS NULL").fetchone()[0] == 0:
            self.db.execute("INSERT INTO windows(opened_at) VALUES (?)", (time.time(),))

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE, then COMMIT; ROLLBACK and re-raise on any error (an interrupt too).

        Examples
        --------
        >>> import tempfile
        >>> store = RowStore(Path(tempfile.mkdtemp()) / "rows.sqlite3", dim=2)
        >>> try:
        ...     with store.transaction():
        ...         row = store.insert(TicketRecord(id="a", text="hi"), window=store.open_window(), probe=False,
        ...                            added_at=0.0, embedding=np.zeros(2, np.float32), key=0.5)
        ...         raise KeyboardInterrupt
        ... except KeyboardInterrupt:
        ...     pass
        >>> store.count(), store.seen(["a"])
        (0, set())
        """
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def vectors(self, rows: Sequence[StoredRow]) -> np.ndarray:
        """The rows' embeddings, one per line (the rows must have been read with them)."""
        return self._decode([row.embedding for row in rows if row.embedding is not None], len(rows))

    # -- writing (inside `transaction()` where several writes must land together) ------------
    def insert(self, record: TicketRecord, *, window: int, probe: bool, added_at: float,
               embedding: np.ndarray, key: float) -> int:
        """Store one ticket; returns its row id."""
        row = self.db.execute(
            "INSERT INTO records(id, text, label, reply, messages, window, probe, added_at, embedding, key)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (record.id, record.text, record.label, record.reply,
             None if record.messages is None else json.dumps([t.model_dump() for t in record.messages]),
             window, probe, added_at, embedding.tobytes(), key),
        ).lastrowid
        assert row is not None
        return row

    def skip_near_duplicates(self, copies: Iterable[tuple[str, str]]) -> None:
        """Remember (id, id of the ticket it copies) pairs, so a redelivery stays skipped."""
        self.db.executemany("INSERT INTO skipped(id, reason, duplicate_of) VALUES (?, ?, ?)",
                            [(ticket_id, "near_duplicate", of) for ticket_id, of in copies])

    def evict(self, rows: Sequence[StoredRow]) -> None:
        for chunk in chunks([r.row for r in rows], 500):
            self.db.execute(f"DELETE FROM records WHERE row IN ({_marks(chunk)})", chunk)
        # Remembered, so a late redelivery of an evicted ticket does not store it again.
        self.db.executemany("INSERT OR IGNORE INTO skipped(id, reason) VALUES (?, 'evicted')",
                            [(r.id,) for r in rows])

    def flag_suspects(self, rows: Iterable[int]) -> None:
        self.db.executemany("UPDATE records SET suspect = 1 WHERE row = ?", [(row,) for row in rows])

    def move_to_training(self, rows: Iterable[int]) -> None:
        self.db.executemany("UPDATE records SET probe = 0 WHERE row = ?", [(row,) for row in rows])

    def close_window(self, window: int) -> None:
        """Close `window` and open the next."""
        self.db.execute("UPDATE windows SET closed_at = ? WHERE id = ?", (time.time(), window))
        self.db.execute("INSERT INTO windows(opened_at) VALUES (?)", (time.time(),))

    # -- reading ----------------------------------------------------------------------------
    def count(self) -> int:
        count: int = self.db.execute("SELECT COUNT(*) FROM records").fetchone()[0]
        return count

    def row_ids(self) -> np.ndarray:
        return np.array([r[0] for r in self.db.execute("SELECT row FROM records")], dtype=np.int64)

    def seen(self, ids: Sequence[str]) -> set[str]:
        """The ids among `ids` stored, or skipped (as near-duplicates or evicted)."""
        return {row[0] for chunk in chunks(ids, 500) for table in ("records", "skipped")
                for row in self.db.execute(f"SELECT id FROM {table} WHERE id IN ({_marks(chunk)})", chunk)}

    def open_window(self) -> int:
        window: int = self.db.execute(
            "SELECT id FROM windows WHERE closed_at IS NULL ORDER BY id DESC LIMIT 1").fetchone()[0]
        return window

    def size(self, window: int) -> int:
        """Rows of `window`, both sides."""
        count: int = self.db.execute("SELECT COUNT(*) FROM records WHERE window = ?", (window,)).fetchone()[0]
        return count

    def oldest(self, window: int) -> float | None:
        """When the first row of `window` was stored (epoch seconds); None when it is empty."""
        oldest: float | None = self.db.execute(
            "SELECT MIN(added_at) FROM records WHERE window = ?", (window,)).fetchone()[0]
        return oldest

    def label_counts(self) -> dict[str, int]:
        return dict(self.db.execute(
            "SELECT label, COUNT(*) FROM records WHERE label IS NOT NULL GROUP BY label ORDER BY label"))

    def skipped_counts(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT reason, COUNT(*) FROM skipped GROUP BY reason ORDER BY reason"))

    def windows(self) -> list[WindowInfo]:
        rows = self.db.execute(
            "SELECT w.id, w.closed_at IS NOT NULL,"
            " SUM(CASE WHEN r.probe = 0 THEN 1 ELSE 0 END), SUM(r.probe),"
            " GROUP_CONCAT(DISTINCT r.label)"
            " FROM windows w LEFT JOIN records r ON r.window = w.id GROUP BY w.id ORDER BY w.id"
        ).fetchall()
        return [WindowInfo(w, bool(closed), train or 0, probe or 0,
                           tuple(sorted(labels.split(","))) if labels else ())
                for w, closed, train, probe, labels in rows]

    def rows(self, windows: Iterable[int], *, probe: bool, suspects: bool = True,
             embeddings: bool = False) -> list[StoredRow]:
        """Rows of the given windows, the probe side or the training side, in arrival order;
        without likely mislabels unless `suspects`."""
        wanted = list(windows)
        if not wanted:
            return []
        return self._select(f"WHERE r.probe = ? AND r.window IN ({_marks(wanted)})"
                            f"{'' if suspects else ' AND r.suspect = 0'} ORDER BY r.row",
                            (int(probe), *wanted), embeddings=embeddings)

    def labelled(self, window: int, *, embeddings: bool = True) -> list[StoredRow]:
        """The labelled rows of `window`, both sides."""
        return self._select("WHERE r.window = ? AND r.label IS NOT NULL", (window,), embeddings=embeddings)

    def evictable(self) -> list[StoredRow]:
        """Closed windows' training rows, with their embeddings, in arrival order."""
        return self._select("JOIN windows w ON r.window = w.id WHERE w.closed_at IS NOT NULL AND r.probe = 0"
                            " ORDER BY r.row", (), embeddings=True)

    def by_row(self, rows: Iterable[int]) -> dict[int, StoredRow]:
        """The stored rows among `rows` (an index may still hold evicted ones), by row id."""
        found = [hit for chunk in chunks(sorted(set(rows)), 500)
                 for hit in self._select(f"WHERE r.row IN ({_marks(chunk)})", chunk)]
        return {hit.row: hit for hit in found}

    def column(self, rows: Iterable[int], column: str) -> dict[int, str | None]:
        """`column` of the stored rows among `rows`, by row id."""
        return {row: value for chunk in chunks(sorted(set(rows)), 500) for row, value in self.db.execute(
            f"SELECT row, {column} FROM records WHERE row IN ({_marks(chunk)})", chunk)}

    def sample_vectors(self, n: int) -> np.ndarray:
        """The embeddings of `n` rows in key order: a random sample, the key being a random hash."""
        blobs = [r[0] for r in self.db.execute("SELECT embedding FROM records ORDER BY key LIMIT ?", (n,))]
        return self._decode(blobs, len(blobs))

    def embedding_blocks(self, block: int = 10_000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(row ids, embeddings) in blocks of `block` rows, so a rebuild never holds them all twice."""
        last = 0
        while True:
            rows = self.db.execute(
                "SELECT row, embedding FROM records WHERE row > ? ORDER BY row LIMIT ?", (last, block)
            ).fetchall()
            if not rows:
                return
            ids = np.array([r[0] for r in rows], dtype=np.int64)
            yield ids, self._decode([r[1] for r in rows], len(rows))
            last = int(ids[-1])

    def _decode(self, blobs: Sequence[bytes], rows: int) -> np.ndarray:
        """`rows` embeddings from their stored bytes (fewer blobs than rows is an error)."""
        return np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(rows, self.dim)

    def _select(self, clauses: str, params: Sequence[object], *, embeddings: bool = False) -> list[StoredRow]:
        embedding = "r.embedding" if embeddings else "NULL"
        return [StoredRow(*hit) for hit in self.db.execute(
            f"SELECT r.row, r.id, r.text, r.label, r.reply, r.messages, r.key, {embedding} FROM records r {clauses}",
            params)]


def chunks(items: Sequence[T], size: int) -> Iterator[list[T]]:
    for start in range(0, len(items), size):
        yield list(items[start:start + size])


def _marks(values: Sized) -> str:
    """SQL placeholders for `values`: `?,?,?`."""
    return ",".join("?" * len(values))
