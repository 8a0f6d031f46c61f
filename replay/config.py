"""Settings of the replay buffer."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field


class ReplaySettings(BaseModel):
    """Where rows and vectors live, and how each window is split into train and probe."""

    embedding_model: Path | None = Field(
        None, description="Sentence-transformers model directory. Unset: the bundled all-MiniLM-L6-v2."
    )
    embed_batch_size: int = Field(64, gt=0, description="Texts embedded per forward pass.")
    probe_percent: int = Field(
        20, ge=1, le=50, description="Share of each window held out as its probe set (by hash of `id`)."
    )
