"""The FAISS index as derived from the rows: the saved one when it still covers them, else one
rebuilt from the stored embeddings.

SQLite is the source of truth (each row keeps its embedding); the index is saved on close and
rebuilt on open when it does not cover the rows, so a crash at any moment loses neither rows nor
the index. Row ids are AUTOINCREMENT: an evicted row's id is never reused, so a stale id in the
index can never point at another ticket.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from replay.config import ReplaySettings
from replay.index import Kind, VectorIndex, kind_for
from replay.store import RowStore

LOG = logging.getLogger(__name__)


def open_index(path: Path, store: RowStore, settings: ReplaySettings) -> VectorIndex:
    """The index saved at `path` when it is of the kind the rows want and holds every row (ids
    of rows evicted since it was saved are dropped); else one rebuilt from the rows."""
    rows = store.row_ids()
    want = kind_for(len(rows), settings)
    index = VectorIndex.load(path, store.dim, settings)
    if index is not None and index.kind == want:
        stored = index.ids()
        if np.isin(rows, stored).all():  # every row is searchable; extras are evicted rows
            extra = stored[~np.isin(stored, rows)]
            index.remove(extra)
            return index
        LOG.warning("FAISS index misses rows (%d indexed, %d rows): rebuilding", len(stored), len(rows))
    return build_index(store, want, settings, len(rows))


def build_index(store: RowStore, kind: Kind, settings: ReplaySettings, rows: int) -> VectorIndex:
    """A `kind` index over the store's `rows` rows, trained (when its kind needs it) on a random sample."""
    index = VectorIndex(store.dim, kind, settings)
    if wanted := index.train_sample_size(rows):  # a random sample: the key is a random hash
        sample = store.sample_vectors(wanted)
        if len(sample):
            index.train(sample, rows)
    for ids, vectors in store.embedding_blocks():
        index.add(vectors, ids)
    LOG.info("built a %s index over %d rows", kind, index.ntotal)
    return index
