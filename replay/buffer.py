"""The replay buffer: ticket rows in SQLite (`replay.store`), their embeddings in a FAISS
inner-product index (`replay.index`) derived from the rows (`replay.rebuild`), so a crash at any
moment loses neither; this module keeps the two in step, and curates what enters.

Before a ticket is stored it is curated (`replay.curate`): PII redacted, near-duplicates of a
stored ticket skipped (remembered in `skipped`, so the id stays idempotent). When its window
closes, every label keeps at least one training row, and a ticket whose nearest labelled
neighbours in the whole buffer agree on another label is flagged as a likely mislabel (kept, but
never drawn for replay). Past `capacity`, closed
windows' training rows are evicted by policy (`replay.policy`); probe rows and the open window
are never evicted.
"""

from __future__ import annotations

import logging
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
from replay.index import IndexState, kind_for
from replay.policy import (
    choose_victims,
    eviction_groups,
    eviction_key,
    is_probe,
    probe_draw,
    replay_rows,
    sample_positions,
    unlearnable,
)
from replay.rebuild import build_index, open_index
from replay.shortlist import Advice, advise
from replay.store import RowStore, WindowInfo, chunks
from streams.records import TicketRecord

LOG = logging.getLogger(__name__)
__all__ = ["ReplayBuffer", "SamplePolicy", "Snapshot", "WindowInfo", "is_probe"]


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
        self._store = RowStore(directory / "buffer.sqlite3", embedder.dim)
        # Cached: COUNT(*) scans the table, and every write asks (capacity, index kind).
        self._count = self._store.count()
        self._index = open_index(self._index_path, self._store, self.settings)

    # -- index ------------------------------------------------------------------------------
    def save(self) -> None:
        """Write the index next to the rows (atomically: temporary file, then rename)."""
        with self._lock:
            self._index.save(self._index_path)

    def close(self) -> None:
        with self._lock:
            self.save()
            self._store.close()

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
            with self._store.transaction():
                rows = [self._store.insert(fresh[i], window=window, probe=is_probe(fresh[i].id, self.probe_percent),
                                           added_at=now, embedding=vectors[i], key=eviction_key(fresh[i].id))
                        for i in keep]
                self._store.skip_near_duplicates((fresh[i].id, of) for i, of in skipped.items())
            self._count += len(rows)
            self._index.add(vectors[keep], np.array(rows, dtype=np.int64))
            self.stats.update(near_duplicate=len(skipped))
            self._enforce_capacity()
            self._maybe_rebuild()

    def _unseen(self, records: Sequence[TicketRecord]) -> list[TicketRecord]:
        """The records whose ids were never stored nor skipped, each id once."""
        unique = {r.id: r for r in records}
        with self._lock:
            known = self._store.seen(list(unique))
        return [r for r in unique.values() if r.id not in known]

    def _redacted(self, record: TicketRecord) -> TicketRecord:
        if not self.settings.redact_pii:
            return record
        counts: Counter[str] = Counter()

        def redacted(text: str) -> str:
            clean, found = redact(text)
            counts.update(found)
            return clean

        update = {"text": redacted(record.text), "reply": record.reply and redacted(record.reply),
                  "messages": record.messages and tuple(t.model_copy(update={"content": redacted(t.content)})
                                                        for t in record.messages)}
        if not counts:
            return record
        self.stats.update({f"redacted_{kind}": n for kind, n in counts.items()})
        return record.model_copy(update=update)

    def _near_duplicates(self, fresh: Sequence[TicketRecord], vectors: np.ndarray
                         ) -> tuple[list[int], dict[int, str]]:
        """Which of `fresh` to keep, and which are near-duplicates (of which id)."""
        if self.settings.near_duplicate_cosine is None:
            return list(range(len(fresh))), {}
        scores, ids = self._index.search(vectors, 1)
        stored = self._store.column([int(i) for i in ids.ravel() if i >= 0], "id")
        neighbours = [[(float(sc), stored[int(j)]) for sc, j in zip(scores[i], ids[i], strict=True)
                       if int(j) in stored][:1] for i in range(len(fresh))]
        return near_duplicates(fresh, vectors, neighbours, self.settings.near_duplicate_cosine)

    def _train_every_label(self, window: int) -> None:
        """Every label of the closing window keeps a training row (`unlearnable`): by the id's
        hash alone, a label of two tickets was all probes once in 25 at 20 %, never learned.

        Not the converse: giving every label a probe cost learning where it was measured (TREC,
        seed 1: final 0.891 -> 0.834, a 4-ticket intent trained on 3), and one probe is too few
        to judge anything by."""
        rows = self._store.labelled(window, embeddings=False)
        probe = self._store.column([r.row for r in rows], "probe")
        moved = unlearnable([r.label for r in rows], [bool(probe[r.row]) for r in rows],
                            [probe_draw(r.id) for r in rows])
        self._store.move_to_training(rows[p].row for p in moved)
        self.stats.update(moved_to_training=len(moved))

    def _flag_suspects(self, window: int) -> None:
        """Flag the window's labelled rows whose `disagreement_k` nearest labelled neighbours in
        the buffer (the window's own rows included, the row itself not) agree on another label."""
        k, share = self.settings.disagreement_k, self.settings.disagreement_share
        rows = self._store.labelled(window)
        if not k or not rows:
            return
        flagged = []
        for chunk in chunks(rows, 10_000):  # searched in blocks, as a rebuild reads them
            _, ids = self._index.search(self._store.vectors(chunk), k + 1)
            labels = self._store.column([int(i) for i in ids.ravel() if i >= 0], "label")
            flagged += [r.row for r, near in zip(chunk, ids.tolist(), strict=True)
                        if disagreement(r.label, [labels[j] for j in near if j in labels and j != r.row][:k], share)]
        self._store.flag_suspects(flagged)
        self.stats.update(suspect=len(flagged))

    def _maybe_rebuild(self) -> None:
        want = kind_for(len(self), self.settings)
        if want != self._index.kind or self._index.needs_rebuild():
            self._index = build_index(self._store, want, self.settings, len(self))

    def _enforce_capacity(self) -> None:
        """Evict closed windows' training rows by policy until the buffer fits `capacity`."""
        capacity = self.settings.capacity
        excess = len(self) - capacity if capacity else 0
        if excess <= 0:
            return
        eligible = self._store.evictable()
        if not eligible:
            LOG.warning("buffer holds %d rows over capacity, none evictable yet (open window or probes)", excess)
            return
        policy, groups = eviction_groups(self.settings.eviction, [r.label for r in eligible],
                                         lambda: self._store.vectors(eligible), self.settings.coverage_clusters)
        victims = [eligible[i] for i in choose_victims(groups, [r.key for r in eligible], excess)]
        with self._store.transaction():
            self._store.evict(victims)
        self._count -= len(victims)
        self._index.remove(np.array([v.row for v in victims], dtype=np.int64))
        self.stats["evicted"] += len(victims)
        LOG.info("evicted %d rows (%s) to keep the buffer at %d", len(victims), policy, capacity)

    def close_window(self) -> int | None:
        """Close the open window if it holds records and open the next; returns the closed id."""
        with self._lock:
            window = self.open_window()
            if not self._store.size(window):
                return None
            with self._store.transaction():
                self._train_every_label(window)
                self._flag_suspects(window)
                self._store.close_window(window)
            self._enforce_capacity()  # its rows just became evictable
            self._maybe_rebuild()
            return window

    # -- reading ----------------------------------------------------------------------------
    def __len__(self) -> int:
        with self._lock:
            return self._count

    def index_matches_rows(self) -> bool:
        """Whether every stored row is in the FAISS index (extra ids are tombstones)."""
        with self._lock:
            rows = self._store.row_ids()
            return bool(np.isin(rows, self._index.ids()).all()) and \
                self._index.ntotal - self._index.stale == len(rows)

    def index_state(self) -> IndexState:
        with self._lock:
            return self._index.state()

    def open_window(self) -> int:
        with self._lock:
            return self._store.open_window()

    def pending(self) -> int:
        """Records in the open window: what the next update would learn."""
        with self._lock:
            return self._store.size(self.open_window())

    def pending_since(self) -> float | None:
        """When the oldest record of the open window arrived (epoch seconds); None when it is empty."""
        with self._lock:
            return self._store.oldest(self.open_window())

    def label_counts(self) -> dict[str, int]:
        """Stored records per label (probe rows included; unlabelled rows are not counted)."""
        with self._lock:
            return self._store.label_counts()

    def skipped_counts(self) -> dict[str, int]:
        """Ids refused or removed for good, by reason (`near_duplicate`, `evicted`), over the
        buffer's whole life (unlike `stats`, which counts since this process started)."""
        with self._lock:
            return self._store.skipped_counts()

    def windows(self) -> list[WindowInfo]:
        with self._lock:
            return self._store.windows()

    def records(self, windows: Iterable[int], *, probe: bool) -> list[TicketRecord]:
        """Rows of the given windows, the probe side or the training side, in arrival order."""
        with self._lock:
            rows = self._store.rows(windows, probe=probe)
        return [row.record() for row in rows]

    def sample(self, k: int, windows: Iterable[int], *, seed: int | None = None,
               policy: SamplePolicy = "uniform") -> list[TicketRecord]:
        """Up to k distinct training rows of the given windows, drawn by `policy`: `uniform`,
        `class-balanced` (labels as even as their counts allow) or `coverage` (even over k-means
        clusters of the embeddings). Probe rows and likely-mislabelled rows are never drawn."""
        with self._lock:
            pool = self._store.rows(windows, probe=False, suspects=False, embeddings=policy == "coverage")
        picked = sample_positions(policy, [row.label for row in pool], lambda: self._store.vectors(pool), k, seed,
                                  self.settings.coverage_clusters)
        return [pool[i].record() for i in picked]

    def search(self, text: str, k: int = 5) -> list[tuple[TicketRecord, float]]:
        """The k stored tickets nearest in meaning to `text`, with cosine similarity."""
        vector = self.embedder.encode([text])
        with self._lock:
            scores, ids = self._index.search(vector, k)
            found = [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0]
            rows = self._store.by_row(i for i, _ in found)
        return [(rows[i].record(), score) for i, score in found if i in rows][:k]

    def neighbour_labels(self, texts: Sequence[str], k: int, *, probes: bool = True,
                         left_out: Sequence[str] = ()) -> list[list[tuple[str, float]]]:
        """For each text, (label, cosine) of its k nearest labelled tickets, nearest first: the
        votes of `replay.shortlist.shortlist`. With `probes=False` probe rows do not vote, so a
        probe scored by the gate is never shortlisted by its own stored copy. `left_out` (one
        record id per text, or none) keeps a stored ticket from voting on its own text: the vote
        a new ticket like it would get. Unlabelled (and non-voting) rows are skipped among the 2k
        nearest, so a buffer where most rows are such gives fewer than k."""
        vectors = self.embedder.encode(texts)  # outside the lock, as in `add_many`
        with self._lock:
            scores, ids = self._index.search(vectors, 2 * k)  # an exact search costs the same for 2k
            hits = [int(i) for i in ids.ravel() if i >= 0]
            labels = self._store.column(hits, "label")
            probe = {} if probes else self._store.column(hits, "probe")
            record_ids = self._store.column(hits, "id") if left_out else {}
        own: Sequence[str | None] = left_out or [None] * len(texts)
        return [[(label, float(score)) for i, score in zip(row_ids.tolist(), row_scores.tolist(), strict=True)
                 if (label := labels.get(i)) is not None and not probe.get(i)
                 and (mine is None or record_ids.get(i) != mine)][:k]
                for row_ids, row_scores, mine in zip(ids, scores, own, strict=True)]

    def advise(self, texts: Sequence[str], candidates: Sequence[str], size: int, shortlist_neighbours: int, *,
               probes: bool = True, left_out: Sequence[str] = ()) -> list[Advice]:
        """What each text's nearest labelled tickets say about it among `candidates`
        (`replay.shortlist.advise`): a shortlist of `size` (0: none) from the nearest
        `shortlist_neighbours`, and the vote (`replay.vote_neighbours`; none when
        `replay.vote_weight` is 0). The index is not searched when neither is asked for.
        `probes` and `left_out`: which stored tickets do not vote (`neighbour_labels`)."""
        vote_neighbours = self.settings.vote_neighbours if self.settings.vote_weight else 0
        shortlisting = bool(size) and len(candidates) > size
        if not candidates or not (shortlisting or vote_neighbours):
            return [Advice() for _ in texts]
        near = self.neighbour_labels(texts, max(shortlist_neighbours if shortlisting else 0, vote_neighbours),
                                     probes=probes, left_out=left_out)
        return [advise(n, candidates, size, shortlist_neighbours, vote_neighbours) for n in near]

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
