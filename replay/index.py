"""The FAISS side of the buffer: an id-mapped inner-product index, exact or HNSW by size.

Vectors are L2-normalised, so inner product is cosine similarity. The exact index
(`IndexFlatIP`) is the right choice while a query scanning every row stays in the low
milliseconds (tens of thousands of rows); past that an HNSW graph answers in about a
millisecond at a recall near 0.95-0.99 on embedding-like data (see `bench/buffer.py`), and an
IVF index (k-means lists, `nprobe` of them scanned) builds much faster at some recall cost.

HNSW (and IVF behind the id map) cannot delete: an evicted row stays as a tombstone, searches over-fetch by
the number of tombstones and the caller drops ids it no longer stores, and the owner rebuilds
when tombstones pass a share of the index (`needs_rebuild`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import faiss
import numpy as np

from replay.config import ReplaySettings

LOG = logging.getLogger(__name__)
Kind = Literal["flat", "hnsw", "ivf"]
REBUILD_STALE_SHARE = 0.2  # rebuild an HNSW index once a fifth of it is tombstones


def kind_for(rows: int, settings: ReplaySettings) -> Kind:
    """The index kind for a buffer of `rows` rows.

    Examples
    --------
    >>> kind_for(10, ReplaySettings()), kind_for(10**6, ReplaySettings())
    ('flat', 'hnsw')
    >>> kind_for(10**6, ReplaySettings(index="flat"))
    'flat'
    """
    if settings.index != "auto":
        return settings.index
    return "flat" if rows <= settings.exact_max_rows else settings.large_index


def ivf_lists(rows: int, settings: ReplaySettings) -> int:
    """Inverted lists for an IVF index over `rows` rows: 4·√rows, with 39 training rows each.

    Examples
    --------
    >>> ivf_lists(1_000_000, ReplaySettings()), ivf_lists(100, ReplaySettings())
    (4000, 2)
    """
    wanted = settings.ivf_lists or int(4 * rows**0.5)
    return max(1, min(wanted, rows // 39))


class VectorIndex:
    """An `IndexIDMap2` over a flat or HNSW inner-product index, keyed by SQLite row id.

    Examples
    --------
    >>> index = VectorIndex(4, "flat", ReplaySettings())
    >>> index.add(np.eye(4, dtype=np.float32), np.arange(10, 14))
    >>> index.remove(np.array([10]))
    >>> scores, ids = index.search(np.eye(4, dtype=np.float32)[:1], 2)
    >>> sorted(ids[0].tolist())
    [11, 12]
    """

    def __init__(self, dim: int, kind: Kind, settings: ReplaySettings,
                 index: faiss.IndexIDMap2 | None = None) -> None:
        self.dim = dim
        self.kind = kind
        self.settings = settings
        self.stale = 0  # ids in the index that the rows no longer hold (HNSW tombstones)
        self._index = index if index is not None else faiss.IndexIDMap2(self._inner())
        self._tune()

    def _inner(self) -> faiss.Index:
        if self.kind == "flat":
            return faiss.IndexFlatIP(self.dim)
        if self.kind == "ivf":
            # Untrained: the lists are placed by `train` (or the first `add`) from real rows.
            return faiss.IndexIVFFlat(faiss.IndexFlatIP(self.dim), self.dim, 1, faiss.METRIC_INNER_PRODUCT)
        hnsw = faiss.IndexHNSWFlat(self.dim, self.settings.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = self.settings.hnsw_ef_construction
        return hnsw

    def _tune(self) -> None:
        if self.kind == "ivf":
            faiss.downcast_index(self._index.index).nprobe = self.settings.ivf_nprobe
        if self.kind == "hnsw":
            # efSearch is a search-time knob: applied on every load, not taken from the file.
            faiss.downcast_index(self._index.index).hnsw.efSearch = self.settings.hnsw_ef_search

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    def ids(self) -> np.ndarray:
        """Every id in the index, tombstones included."""
        return faiss.vector_to_array(self._index.id_map).astype(np.int64)

    def train(self, sample: np.ndarray, rows: int) -> None:
        """Place an IVF index's lists by k-means over `sample`, sized for `rows` rows."""
        if self.kind != "ivf" or self._index.is_trained:
            return
        lists = ivf_lists(max(rows, len(sample)), self.settings)
        lists = max(1, min(lists, len(sample) // 39))
        quantizer = faiss.IndexFlatIP(self.dim)
        ivf = faiss.IndexIVFFlat(quantizer, self.dim, lists, faiss.METRIC_INNER_PRODUCT)
        ivf.train(np.ascontiguousarray(sample, dtype=np.float32))
        self._quantizer = quantizer  # the IVF index does not own it: keep it alive
        self._index = faiss.IndexIDMap2(ivf)
        self._tune()
        LOG.info("trained an IVF index: %d lists from %d rows", lists, len(sample))

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        if len(ids) and not self._index.is_trained:
            self.train(vectors, len(vectors))
        if len(ids):
            self._index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids.astype(np.int64))

    def remove(self, ids: np.ndarray) -> None:
        """Forget ids: removed from the exact index, tombstoned in HNSW and IVF (an ID map over
        IVF cannot remove: its inner ids are not contiguous)."""
        if not len(ids):
            return
        if self.kind == "flat":
            self._index.remove_ids(ids.astype(np.int64))
        else:
            self.stale += len(ids)

    def needs_rebuild(self) -> bool:
        return self.stale > REBUILD_STALE_SHARE * max(self.ntotal, 1)

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k scores and ids per query; with tombstones it returns up to `k + stale` hits,
        of which the caller keeps those it still stores."""
        wanted = min(k + self.stale, self.ntotal)
        if wanted == 0:
            empty = np.full((len(vectors), k), -1, dtype=np.int64)
            return np.zeros((len(vectors), k), dtype=np.float32), empty
        scores, ids = self._index.search(np.ascontiguousarray(vectors, dtype=np.float32), wanted)
        return scores, ids

    def save(self, path: Path) -> None:
        """Write atomically: a temporary file, then a rename."""
        tmp = path.with_suffix(".tmp")
        faiss.write_index(self._index, str(tmp))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path, dim: int, settings: ReplaySettings) -> VectorIndex | None:
        """The saved index, or None when it is missing, unreadable or of another dimension."""
        if not path.exists():
            return None
        try:
            raw = faiss.read_index(str(path))
        except RuntimeError as exc:  # a torn or foreign file: the rows rebuild it
            LOG.warning("unreadable FAISS index %s: %s", path, exc)
            return None
        if not isinstance(raw, faiss.IndexIDMap2) or raw.d != dim:
            return None
        inner = faiss.downcast_index(raw.index)
        kind: Kind = ("hnsw" if isinstance(inner, faiss.IndexHNSWFlat)
                      else "ivf" if isinstance(inner, faiss.IndexIVFFlat) else "flat")
        return cls(dim, kind, settings, raw)
