from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from service.deps import ServiceDep
from service.forgetting import report

router = APIRouter(prefix="/v1", tags=["forgetting"])


class VersionSummary(BaseModel):
    version: str
    average_accuracy: float | None = Field(description="Mean accuracy over the windows trained so far.")
    forgetting: dict[str, float] = Field(description="Per earlier window: best earlier accuracy − now.")
    average_forgetting: float | None
    drop_since_learned: float | None = Field(
        None, description="Avalanche's `Forgetting`: mean over earlier windows of accuracy when learned − now.")
    backward_transfer: float | None = Field(description="Mean of R[k][j] − R[j][j] over earlier windows.")
    forward_transfer: float | None = Field(description="New windows: accuracy before training − base model's.")
    plasticity: float | None = Field(description="New windows: accuracy gain over the parent version.")


class VersionRow(BaseModel):
    name: str
    parent: str | None
    verdict: str
    live: bool
    pruned: bool = Field(description="Retention deleted its weights; its figures stay.")
    windows_trained: list[int]
    accuracy: dict[str, float] = Field(description="Window → accuracy on its probe set.")
    summary: VersionSummary


class ForgettingReport(BaseModel):
    windows: list[int]
    live: str | None
    base: dict[str, float] = Field(description="Base model (no adapter) accuracy per window.")
    versions: list[VersionRow]


@router.get("/forgetting")
def forgetting(service: ServiceDep) -> ForgettingReport:
    """The accuracy matrix (versions × windows) and each version's forgetting figures."""
    data: dict[str, Any] = report(service.registry, service.matrix)
    return ForgettingReport.model_validate(data)
