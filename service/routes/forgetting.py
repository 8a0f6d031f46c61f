from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, status
from pydantic import BaseModel, Field

from service.deps import ServiceDep
from service.errors import responses
from service.forgetting import report
from service.registry import RegistryError
from service.routes import DEFAULT_ROWS, MAX_ROWS, Before, Limit

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


class ReplyCell(BaseModel):
    """How the version replied on a window's reply probes (probes whose tickets carry a reply)."""

    loss: float | None = Field(description="Mean answer loss of the reference replies, nats/token.")
    rouge_l: float | None = Field(description="Mean ROUGE-L F1 of its greedy answers against the references.")
    matched: float | None = Field(description="Share of the answered with ROUGE-L ≥ 0.8.")
    n: int = Field(description="Reply probes scored.")
    answered: int = Field(description="Of them, answered greedily.")


class VersionRow(BaseModel):
    name: str
    parent: str | None
    verdict: str
    live: bool
    pruned: bool = Field(description="Retention deleted its weights; its figures stay.")
    windows_trained: list[int]
    accuracy: dict[str, float] = Field(description="Window → accuracy on its probe set.")
    replies: dict[str, ReplyCell] = Field(default={}, description="Window → its replies on the window's reply "
                                                                  "probes, measured by the gates that compared it.")
    summary: VersionSummary


class ForgettingReport(BaseModel):
    windows: list[int] = Field(description="The windows whose cells are given (the newest `window_limit`).")
    live: str | None
    base: dict[str, float] = Field(description="Base model (no adapter) accuracy per window.")
    versions: list[VersionRow] = Field(description="Oldest first: the newest `limit` (before `before`), and the live "
                                                   "version wherever it is.")
    versions_total: int = Field(description="Versions in the registry, pruned ones included.")
    windows_total: int = Field(description="Windows measured.")


@router.get("/forgetting", responses=responses(404))
def forgetting(
        service: ServiceDep,
        limit: Limit = DEFAULT_ROWS,
        window_limit: Annotated[int, Query(ge=1, le=MAX_ROWS, description=(
            "Newest windows whose cells and per-window forgetting are returned; averages cover every window."))]
        = DEFAULT_ROWS,
        before: Before = None,
) -> ForgettingReport:
    """The accuracy matrix (versions × windows) and each version's forgetting figures, along its
    own lineage. The matrix grows with both, so a page of it is returned: the newest versions and
    windows by default, older ones with `before`."""
    try:
        data: dict[str, Any] = report(service.registry, service.matrix, limit, window_limit, before)
    except RegistryError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"unknown adapter version {before!r}") from exc
    return ForgettingReport.model_validate(data)
