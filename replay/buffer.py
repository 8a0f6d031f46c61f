"""The replay buffer: ticket rows in SQLite, their embeddings in a FAISS inner-product index.

SQLite is the source of truth (each row keeps its embedding); the FAISS index is derived from
it, saved on close and rebuilt on open when it does not cover the rows, so a crash at any
moment loses neither rows nor the index. Row ids are AUTOINCREMENT: an evicted row's id is
never reused, so a stale id in the index can never point at another ticket.

Before a ticket is stored it is curated (`replay.curate`): PII redacted, near-duplicates of a
stored ticket skipped (remembered in `skipped`, so the id stays idempotent). When its window
closes, a ticket whose nearest labelled neighbours in the whole buffer agree on another label is
flagged as a likely mislabel (kept, but never drawn for replay). Past `capacity`, closed
windows' training rows are evicted by policy (`replay.policy`); probe rows and the open window
are never evicted.
"""

from __future__ import annotations

import logging
import random
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from replay.config import ReplaySettings, SamplePolicy
from replay.curate import disagreement, near_duplicates, redact
from replay.embed import Embedder
from replay.index import VectorIndex, kind_for
from replay.policy import balanced_sample, choose_victims, clusters, eviction_key, is_probe, replay_rows
from replay.schema import SCHEMA
from streams.records import TicketRecord

LOG = logging.getLogger(__name__)
__all__ = ["ReplayBuffer", "SamplePolicy", "Snapshot", "WindowInfo", "is_probe"]



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
    """Durable, idempotent, curated store of tickets, grouped into windows, searchable by meaning.

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

    def __init__(self, directory: Path, embedder: Embedder, probe_percent: int | None = None, *,
                 settings: ReplaySettings | None = None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.embedder = embedder
        self.settings = settings or ReplaySettings()
        self.probe_percent = probe_percent if probe_percent is not None else self.settings.probe_percent
        self.stats: Counter[str] = Counter()  # curation and eviction counts since this process started
        self._index_path = directory / "buffer.faiss"
        self._lock = threading.RLock()
        self._db = sqlite3.connect(directory / "buffer.sqlite3", check_same_thread=False,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a committed batch survives power loss
        self._db.executescript(SCHEMA)
        if self._db.execute("SELECT COUNT(*) FROM windows WHERE closed_at IS NULL").fetchone()[0] == 0:
            self._db.execute("INSERT INTO windows(opened_at) VALUES (?)", (time.time(),))
        # Cached: COUNT(*) scans the table, and every write asks (capacity, index kind).
        self._count: int = self._db.execute("SELECT COUNT(*) FROM records").fetchone()[0]
        self._index = self._open_index()

    # -- index ------------------------------------------------------------------------------
    def _open_index(self) -> VectorIndex:
        rows = np.array([r[0] for r in self._db.execute("SELECT row FROM records")], dtype=np.int64)
        want = kind_for(len(rows), self.settings)
        index = VectorIndex.load(self._index_path, self.embedder.dim, self.settings)
        if index is not None and index.kind == want:
            stored = index.ids()
            if np.isin(rows, stored).all():  # every row is searchable; extras are evicted rows
                extra = stored[~np.isin(stored, rows)]
                index.remove(extra)
                return index
            LOG.warning("FAISS index misses rows (%d indexed, %d rows): rebuilding", len(stored), len(rows))
        return self._build_index(want)

    def _build_index(self, kind: str) -> VectorIndex:
        index = VectorIndex(self.embedder.dim, kind, self.settings)  # type: ignore[arg-type]
        if wanted := index.train_sample_size(len(self)):  # a random sample: the key is a random hash
            sample = self._db.execute("SELECT embedding FROM records ORDER BY key LIMIT ?", (wanted,)).fetchall()
            if sample:
                index.train(self._vectors([r[0] for r in sample]), len(self))
        for ids, vectors in self._embedding_blocks():
            index.add(vectors, ids)
        LOG.info("built a %s index over %d rows", kind, index.ntotal)
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
            yield ids, self._vectors([r[1] for r in rows])
            last = int(ids[-1])

    def _vectors(self, blobs: Sequence[bytes]) -> np.ndarray:
        return np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(blobs), self.embedder.dim)

    def save(self) -> None:
        """Write the index next to the rows (atomically: temporary file, then rename)."""
        with self._lock:
            self._index.save(self._index_path)

    def close(self) -> None:
        with self._lock:
            self.save()
            self._db.close()

    # -- writing ----------------------------------------------------------------------------
    def add_many(self, records: Sequence[TicketRecord]) -> None:
        """Curate and store records in the open window; ids already seen are skipped.
        Durable on return.

        Embedding, the slow part, runs outside the lock, so reads (the API's `/v1/buffer`,
        snapshots) are answered while a large batch is written; the ids are checked again
        under the lock before anything is stored.
        """
        fresh = [self._redacted(r) for r in self._unseen(records)]
        if not fresh:
            return
        vectors = self.embedder.encode([r.text for r in fresh])
        with self._lock:
            still = {r.id for r in self._unseen(fresh)}
            if len(still) < len(fresh):  # another writer stored some of them meanwhile
                mine = [i for i, r in enumerate(fresh) if r.id in still]
                fresh, vectors = [fresh[i] for i in mine], vectors[mine]
            if not fresh:
                return
            keep, skipped = self._near_duplicates(fresh, vectors)
            window = self.open_window()
            now = time.time()
            self._db.execute("BEGIN IMMEDIATE")
            try:
                rows = [
                    self._db.execute(
                        "INSERT INTO records(id, text, label, reply, window, probe, added_at, embedding,"
                        " key) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (fresh[i].id, fresh[i].text, fresh[i].label, fresh[i].reply, window,
                         is_probe(fresh[i].id, self.probe_percent), now, vectors[i].tobytes(),
                         eviction_key(fresh[i].id)),
                    ).lastrowid
                    for i in keep
                ]
                self._db.executemany("INSERT INTO skipped(id, reason, duplicate_of) VALUES (?, ?, ?)",
                                     [(fresh[i].id, "near_duplicate", of) for i, of in skipped.items()])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._count += len(rows)
            self._index.add(vectors[keep], np.array(rows, dtype=np.int64))
            self.stats.update(near_duplicate=len(skipped))
            self._enforce_capacity()
            self._maybe_rebuild()

    def _unseen(self, records: Sequence[TicketRecord]) -> list[TicketRecord]:
        """The records whose ids were never stored nor skipped, each id once."""
        unique = {r.id: r for r in records}
        with self._lock:
            known = {row[0] for chunk in _chunks(list(unique), 500) for table in ("records", "skipped")
                     for row in self._db.execute(
                         f"SELECT id FROM {table} WHERE id IN ({','.join('?' * len(chunk))})", chunk)}
        return [r for r in unique.values() if r.id not in known]

    def _redacted(self, record: TicketRecord) -> TicketRecord:
        if not self.settings.redact_pii:
            return record
        text, counts = redact(record.text)
        reply, reply_counts = redact(record.reply) if record.reply else (record.reply, Counter())
        counts.update(reply_counts)
        if not counts:
            return record
        self.stats.update({f"redacted_{kind}": n for kind, n in counts.items()})
        return record.model_copy(update={"text": text, "reply": reply})

    def _near_duplicates(self, fresh: Sequence[TicketRecord], vectors: np.ndarray
                         ) -> tuple[list[int], dict[int, str]]:
        """Which of `fresh` to keep, and which are near-duplicates (of which id)."""
        if self.settings.near_duplicate_cosine is None:
            return list(range(len(fresh))), {}
        scores, ids = self._index.search(vectors, 1)
        stored = dict(self._column([int(i) for i in ids.ravel() if i >= 0], "id"))
        neighbours = [[(float(sc), stored[int(j)]) for sc, j in zip(scores[i], ids[i], strict=True)
                       if int(j) in stored][:1] for i in range(len(fresh))]
        return near_duplicates(fresh, vectors, neighbours, self.settings.near_duplicate_cosine)

    def _flag_suspects(self, window: int) -> int:
        """Flag the window's labelled rows whose `disagreement_k` nearest labelled neighbours in
        the buffer (the window's own rows included, the row itself not) agree on another label."""
        k, share = self.settings.disagreement_k, self.settings.disagreement_share
        rows = self._db.execute("SELECT row, label, embedding FROM records WHERE window = ? AND label IS NOT NULL",
                                (window,)).fetchall()
        if not k or not rows:
            return 0
        flagged = []
        for chunk in _chunks(rows, 10_000):  # searched in blocks, as a rebuild reads them
            _, ids = self._index.search(self._vectors([r[2] for r in chunk]), k + 1)
            labels = dict(self._column([int(i) for i in ids.ravel() if i >= 0], "label"))
            flagged += [row for (row, label, _), near in zip(chunk, ids.tolist(), strict=True)
                        if disagreement(label, [labels[j] for j in near if j in labels and j != row][:k], share)]
        self._db.executemany("UPDATE records SET suspect = 1 WHERE row = ?", [(row,) for row in flagged])
        self.stats.update(suspect=len(flagged))
        return len(flagged)

    def _column(self, rows: Sequence[int], column: str) -> list[tuple[int, str | None]]:
        """(row, `column`) of the stored rows among `rows` (an index may still hold evicted ones)."""
        return [hit for chunk in _chunks(sorted(set(rows)), 500) for hit in self._db.execute(
            f"SELECT row, {column} FROM records WHERE row IN ({','.join('?' * len(chunk))})", chunk)]

    def _maybe_rebuild(self) -> None:
        want = kind_for(len(self), self.settings)
        if want != self._index.kind or self._index.needs_rebuild():
            self._index = self._build_index(want)

    def _enforce_capacity(self) -> None:
        """Evict closed windows' training rows by policy until the buffer fits `capacity`."""
        capacity = self.settings.capacity
        excess = len(self) - capacity if capacity else 0
        if excess <= 0:
            return
        eligible = self._db.execute(
            "SELECT r.row, r.id, r.label, r.key, r.embedding FROM records r JOIN windows w ON r.window = w.id"
            " WHERE w.closed_at IS NOT NULL AND r.probe = 0 ORDER BY r.row").fetchall()
        if not eligible:
            LOG.warning("buffer holds %d rows over capacity, none evictable yet (open window or probes)", excess)
            return
        policy = self.settings.eviction
        if policy == "auto":
            policy = "class-balanced" if any(r[2] is not None for r in eligible) else "reservoir"
        if policy == "class-balanced":
            groups: Sequence[object] = [r[2] for r in eligible]
        elif policy == "coverage":
            groups = clusters(self._vectors([r[4] for r in eligible]), self.settings.coverage_clusters).tolist()
        else:
            groups = [0] * len(eligible)
        victims = [eligible[i] for i in choose_victims(groups, [r[3] for r in eligible], excess)]
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for chunk in _chunks([v[0] for v in victims], 500):
                self._db.execute(f"DELETE FROM records WHERE row IN ({','.join('?' * len(chunk))})", chunk)
            # Remembered, so a late redelivery of an evicted ticket does not store it again.
            self._db.executemany("INSERT OR IGNORE INTO skipped(id, reason) VALUES (?, 'evicted')",
                                 [(v[1],) for v in victims])
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._count -= len(victims)
        self._index.remove(np.array([v[0] for v in victims], dtype=np.int64))
        self.stats["evicted"] += len(victims)
        LOG.info("evicted %d rows (%s) to keep the buffer at %d", len(victims), policy, capacity)

    def close_window(self) -> int | None:
        """Close the open window if it holds records and open the next; returns the closed id."""
        with self._lock:
            window = self.open_window()
            if self._db.execute("SELECT 1 FROM records WHERE window = ? LIMIT 1", (window,)).fetchone() is None:
                return None
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._flag_suspects(window)
                self._db.execute("UPDATE windows SET closed_at = ? WHERE id = ?", (time.time(), window))
                self._db.execute("INSERT INTO windows(opened_at) VALUES (?)", (time.time(),))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._enforce_capacity()  # its rows just became evictable
            self._maybe_rebuild()
            return window

    # -- reading ----------------------------------------------------------------------------
    def __len__(self) -> int:
        with self._lock:
            return self._count

    def contains(self, ticket_id: str) -> bool:
        """Whether the id was seen: stored, or skipped as a near-duplicate or evicted."""
        with self._lock:
            return any(self._db.execute(f"SELECT 1 FROM {table} WHERE id = ?", (ticket_id,)).fetchone()
                       for table in ("records", "skipped"))

    def index_matches_rows(self) -> bool:
        """Whether every stored row is in the FAISS index (extra ids are tombstones)."""
        with self._lock:
            rows = np.array([r[0] for r in self._db.execute("SELECT row FROM records")], dtype=np.int64)
            return bool(np.isin(rows, self._index.ids()).all()) and \
                self._index.ntotal - self._index.stale == len(rows)

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

    def pending_since(self) -> float | None:
        """When the oldest record of the open window arrived (epoch seconds); None when it is empty."""
        with self._lock:
            oldest: float | None = self._db.execute(
                "SELECT MIN(added_at) FROM records WHERE window = ?", (self.open_window(),)).fetchone()[0]
            return oldest

    def label_counts(self) -> dict[str, int]:
        """Stored records per label (probe rows included; unlabelled rows are not counted)."""
        with self._lock:
            return dict(self._db.execute(
                "SELECT label, COUNT(*) FROM records WHERE label IS NOT NULL GROUP BY label ORDER BY label"))

    def skipped_counts(self) -> dict[str, int]:
        """Ids refused or removed for good, by reason (`near_duplicate`, `evicted`), over the
        buffer's whole life (unlike `stats`, which counts since this process started)."""
        with self._lock:
            return dict(self._db.execute("SELECT reason, COUNT(*) FROM skipped GROUP BY reason ORDER BY reason"))

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
        return [_record(row[1:5]) for row in self._rows(windows, probe=probe)]

    def _rows(self, windows: Iterable[int], *, probe: bool, suspects: bool = True,
              embeddings: bool = False) -> list[tuple]:  # type: ignore[type-arg]
        wanted = list(windows)
        if not wanted:
            return []
        with self._lock:
            return self._db.execute(
                f"SELECT row, id, text, label, reply{', embedding' if embeddings else ''} FROM records"
                f" WHERE probe = ? AND window IN ({','.join('?' * len(wanted))})"
                f"{'' if suspects else ' AND suspect = 0'} ORDER BY row", (int(probe), *wanted)).fetchall()

    def sample(self, k: int, windows: Iterable[int], *, seed: int | None = None,
               policy: SamplePolicy = "uniform") -> list[TicketRecord]:
        """Up to k distinct training rows of the given windows, drawn by `policy`: `uniform`,
        `class-balanced` (labels as even as their counts allow) or `coverage` (even over k-means
        clusters of the embeddings). Probe rows and likely-mislabelled rows are never drawn."""
        pool = self._rows(windows, probe=False, suspects=False, embeddings=policy == "coverage")
        if policy == "uniform":
            picked = random.Random(seed).sample(range(len(pool)), min(k, len(pool)))
        elif policy == "class-balanced":
            picked = balanced_sample([row[3] for row in pool], k, seed)
        elif policy == "coverage":
            groups = clusters(self._vectors([row[5] for row in pool]), self.settings.coverage_clusters,
                              seed=seed or 0) if pool else np.zeros(0)
            picked = balanced_sample(groups.tolist(), k, seed)
        else:
            raise ValueError(f"unknown sampling policy {policy!r}")
        return [_record(pool[i][1:5]) for i in picked]

    def search(self, text: str, k: int = 5) -> list[tuple[TicketRecord, float]]:
        """The k stored tickets nearest in meaning to `text`, with cosine similarity."""
        vector = self.embedder.encode([text])
        with self._lock:
            scores, ids = self._index.search(vector, k)
            found = [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0]
            rows = {row[0]: row[1:] for chunk in _chunks([i for i, _ in found], 500) for row in self._db.execute(
                f"SELECT row, id, text, label, reply FROM records WHERE row IN"
                f" ({','.join('?' * len(chunk))})", chunk)}
        return [(_record(rows[i]), score) for i, score in found if i in rows][:k]

    def snapshot(self, trained_windows: Iterable[int], seed: int, skip: Iterable[int] = ()) -> Snapshot:
        """Training material for one update: every closed window not yet trained is new, and
        replay rows (`replay_rows` of them, by `replay_policy`) come from the windows already
        trained. Windows in `skip` (quarantined by a rejection) are left out altogether: neither
        learned nor used as probes."""
        trained, skipped = set(trained_windows), set(skip) - set(trained_windows)
        closed = [w for w in self.windows() if w.closed and w.id not in skipped]
        new_windows = tuple(w.id for w in closed if w.id not in trained)
        new = self.records(new_windows, probe=False)
        old = [w for w in closed if w.id in trained]
        size = replay_rows([r.label for r in new], {label for w in old for label in w.labels})
        return Snapshot(
            new_windows=new_windows,
            new=new,
            replay=self.sample(size, [w.id for w in old], seed=seed, policy=self.settings.replay_policy),
            probes={w.id: self.records([w.id], probe=True) for w in closed},
            labels=tuple(sorted({label for w in closed for label in w.labels})),
        )


def _record(row: Sequence[str | None]) -> TicketRecord:
    ticket_id, text, label, reply = row
    assert ticket_id is not None and text is not None
    return TicketRecord(id=ticket_id, text=text, label=label, reply=reply)


def _chunks(items: Sequence[object], size: int) -> Iterable[list[object]]:
    for start in range(0, len(items), size):
        yield list(items[start:start + size])
