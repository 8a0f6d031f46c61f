"""The FAISS side of the buffer: an id-mapped inner-product index, exact or approximate by size.

Vectors are L2-normalised, so inner product is cosine similarity. The exact index
(`IndexFlatIP`) is the right choice while a query scanning every row stays in the low
milliseconds (tens of thousands of rows). Past that, the default (`pq`) still visits every
row, but through 4-bit product-quantised codes scanned with SIMD lookups (FAISS fast-scan, 1/16
of the float bytes), and re-ranks the best candidates exactly: its recall does not depend on the
data having clusters. Graph (HNSW) and partition (IVF) indexes skip most rows, which is faster
on clustered embeddings but loses most true neighbours on unstructured data (see
`bench/buffer.py`).

The approximate indexes cannot delete behind the id map: an evicted row stays as a tombstone,
searches over-fetch by the number of tombstones and the caller drops ids it no longer stores,
and the owner rebuilds when tombstones pass a share of the index (`needs_rebuild`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal, NamedTuple

import faiss
import numpy as np

from replay.config import ReplaySettings

LOG = logging.getLogger(__name__)
Kind = Literal["flat", "hnsw", "ivf", "pq"]

REBUILD_STALE_SHARE = 0.2  # rebuild an approximate index once a fifth of it is tombstones
# Two dimensions per 4-bit sub-quantiser: with one per 4 dimensions, uniform random vectors needed
# 20x more exact re-ranking for the same recall, which cost more than the longer codes' scan.
PQ_DIMS_PER_CODE = 2
PQ_MIN_TRAIN_ROWS = 256  # k-means of 16 centroids per sub-space wants well over 16 points
PQ_TRAIN_SAMPLE = 50_000  # more rows than this barely move 16 centroids in 2 dimensions


class IndexState(NamedTuple):
    kind: Kind
    vectors: int  # tombstones included
    tombstones: int  # vectors of rows no longer stored, left in place until the next rebuild


def kind_for(rows: int, settings: ReplaySettings) -> Kind:
    """The index kind for a buffer of `rows` rows.

    Examples
    --------
    >>> kind_for(10, ReplaySettings()), kind_for(10**6, ReplaySettings())
    ('flat', 'pq')
    >>> kind_for(10**6, ReplaySettings(index="flat"))
    'flat'
    >>> kind_for(10, ReplaySettings(index="pq")), kind_for(10**6, ReplaySettings(index="pq"))
    ('flat', 'pq')
    """
    if settings.index == "pq" and rows < PQ_MIN_TRAIN_ROWS:  # too few rows to train its codebooks
        return "flat"
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
    """An `IndexIDMap2` over a flat or approximate inner-product index, keyed by SQLite row id.

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
        if self.kind == "pq":  # untrained too: its codebooks are learnt by `train`
            codes = faiss.IndexPQFastScan(self.dim, self.dim // PQ_DIMS_PER_CODE, 4, faiss.METRIC_INNER_PRODUCT)
            return faiss.IndexRefineFlat(codes)
        hnsw = faiss.IndexHNSWFlat(self.dim, self.settings.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = self.settings.hnsw_ef_construction
        return hnsw

    def _tune(self) -> None:
        if self.kind == "ivf":
            faiss.downcast_index(self._index.index).nprobe = self.settings.ivf_nprobe
        if self.kind == "hnsw":
            # efSearch is a search-time knob: applied on every load, not taken from the file.
            faiss.downcast_index(self._index.index).hnsw.efSearch = self.settings.hnsw_ef_search
        if self.kind == "pq":
            faiss.downcast_index(self._index.index).k_factor = self.settings.pq_refine_factor

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    def state(self) -> IndexState:
        return IndexState(self.kind, self.ntotal, self.stale)

    def ids(self) -> np.ndarray:
        """Every id in the index, tombstones included."""
        return faiss.vector_to_array(self._index.id_map).astype(np.int64)

    def train_sample_size(self, rows: int) -> int:
        """Rows `train` wants for an index of `rows` rows (0: this kind needs no training)."""
        if self.kind == "ivf":
            return min(rows, 100 * ivf_lists(rows, self.settings))
        return min(rows, PQ_TRAIN_SAMPLE) if self.kind == "pq" else 0

    def train(self, sample: np.ndarray, rows: int) -> None:
        """Learn a `pq` index's codebooks, or place an IVF index's lists sized for `rows` rows,
        by k-means over `sample`."""
        if self._index.is_trained:
            return
        sample = np.ascontiguousarray(sample, dtype=np.float32)
        if self.kind == "pq":
            self._index.train(sample)
            LOG.info("trained a PQ index's codebooks from %d rows", len(sample))
            return
        lists = ivf_lists(max(rows, len(sample)), self.settings)
        lists = max(1, min(lists, len(sample) // 39))
        quantizer = faiss.IndexFlatIP(self.dim)
        ivf = faiss.IndexIVFFlat(quantizer, self.dim, lists, faiss.METRIC_INNER_PRODUCT)
        ivf.train(sample)
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
        """Forget ids: removed from the exact index, tombstoned in the approximate ones (an ID map
        over them cannot remove: their inner ids are not contiguous)."""
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
                      else "ivf" if isinstance(inner, faiss.IndexIVFFlat)
                      else "pq" if isinstance(inner, faiss.IndexRefineFlat) else "flat")
        return cls(dim, kind, settings, raw)
