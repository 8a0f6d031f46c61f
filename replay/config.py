"""Settings of the replay buffer."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator

IndexKind = Literal["auto", "flat", "hnsw", "ivf", "pq"]
EvictionPolicy = Literal["auto", "reservoir", "class-balanced", "coverage"]
SamplePolicy = Literal["uniform", "class-balanced", "coverage"]


class ReplaySettings(BaseModel):
    """Where rows and vectors live, how they are curated and bounded, and how windows split."""

    embedding_model: Path | None = Field(
        None, description="Sentence-transformers model directory. Unset: the bundled all-MiniLM-L6-v2."
    )
    embed_batch_size: int = Field(64, gt=0, description="Texts embedded per forward pass.")
    probe_percent: int = Field(
        20, ge=1, le=50, description="Share of each window held out as its probe set (by hash of `id`)."
    )
    # -- index ------------------------------------------------------------------------------
    index: IndexKind = Field(
        "auto", description="FAISS index: `flat` (exact), `pq`, `hnsw` or `ivf` (approximate), `auto` (by size)."
    )
    exact_max_rows: int = Field(
        50_000, gt=0, description="`auto` switches from the exact index to `large_index` above this many rows."
    )
    large_index: Literal["pq", "hnsw", "ivf"] = Field(
        "pq", description="What `auto` uses past `exact_max_rows`: `pq` (a 4-bit product-quantised scan of "
        "every row, then exact re-ranking: high recall on any data, time linear in rows, about 3 ms per "
        "million on one core), `hnsw` (sub-linear, but recall collapses on data without structure) or "
        "`ivf` (fast to build, recall set by `ivf_nprobe`)."
    )
    pq_refine_factor: int = Field(
        20, ge=1, description="`pq`: candidates re-ranked exactly per result wanted (recall vs speed)."
    )
    ivf_lists: int | None = Field(
        None, gt=0, description="IVF inverted lists (unset: 4·√rows, at least 39 training rows per list)."
    )
    ivf_nprobe: int = Field(32, gt=0, description="IVF lists scanned per query (recall vs speed).")
    hnsw_m: int = Field(32, ge=4, le=128, description="HNSW graph degree (memory and recall grow with it).")
    hnsw_ef_search: int = Field(128, ge=8, description="HNSW candidates examined per query (recall vs speed).")
    hnsw_ef_construction: int = Field(64, ge=8, description="HNSW candidates examined per insertion.")
    # -- curation ---------------------------------------------------------------------------
    redact_pii: bool = Field(True, description="Redact e-mails, phone, card and IBAN numbers before storage.")
    # Off by default: two customers asking the same thing are two tickets (and two votes for
    # the class balance). Set it (0.98 is a good start) to keep the memory free of copies.
    near_duplicate_cosine: float | None = Field(
        None, gt=0, le=1, description="Skip a ticket at least this cosine-similar to a stored one "
        "(unset: keep all)."
    )
    disagreement_k: int = Field(
        5, ge=0, description="Neighbours consulted to flag a likely mislabelled ticket (0: off)."
    )
    disagreement_share: float = Field(
        0.8, gt=0.5, le=1, description="Flag when at least this share of labelled neighbours agree on "
        "another label."
    )
    # -- capacity ---------------------------------------------------------------------------
    capacity: int | None = Field(
        None, gt=0, description="Most rows kept (unset: unbounded); only closed windows' training rows "
        "are evicted."
    )
    eviction: EvictionPolicy = Field(
        "auto", description="`reservoir`, `class-balanced`, `coverage` (k-means clusters), or `auto`: "
        "class-balanced when the rows carry labels, else reservoir."
    )
    coverage_clusters: int = Field(32, ge=2, description="k-means clusters of the `coverage` policy.")
    # -- the buffer's vote -------------------------------------------------------------------
    vote_neighbours: int = Field(
        16, gt=0, description="Nearest labelled tickets (among a ticket's candidate labels) whose summed "
        "similarity votes for its label, beside the model's own scores (`vote_weight`)."
    )
    vote_weight: float = Field(
        2.0, ge=0, description="How much the buffer's vote weighs in an answer, in `/v1/classify` and in the "
        "gate alike: a label's score is its log-probability under the model among the candidates plus "
        "`vote_weight` × log(its vote share + 0.01). Chosen on five streams (docs/benchmarks.md); 0: the "
        "model alone."
    )
    # -- replay -----------------------------------------------------------------------------
    replay_policy: SamplePolicy = Field(
        "class-balanced", description="How an update draws its replay rows from the trained windows: "
        "`uniform`, `class-balanced` (labels as even as their counts allow) or `coverage` (even over "
        "k-means clusters of the embeddings). As many rows per earlier label as the new rows have per "
        "new label are drawn."
    )

    @model_validator(mode="after")
    def _hnsw_search_is_wide_enough(self) -> ReplaySettings:
        if self.hnsw_ef_search < 10:
            raise ValueError("`hnsw_ef_search` must be at least the k of a kNN@10 query")
        return self
