from __future__ import annotations

import itertools
from dataclasses import fields
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, status
from pydantic import BaseModel, Field

from learners.reports import GateReport, GateSummary, SearchReport, TrainingProgress
from service.deps import AdminDep, PrimaryDep, ServiceDep
from service.errors import responses
from service.update_log import UpdateRecord, UpdateStage
from service.update_manager import UpdateInProgress, UpdateNotRunning

router = APIRouter(prefix="/v1", tags=["updates"])


class UpdateFields(BaseModel):
    """An update as users see it, but for its gate report."""

    id: int
    trigger: str
    status: str
    stage: UpdateStage = Field(description="preparing (waiting for the tickets sent, loading, snapshotting), "
                                           "searching (the hyperparameter search's trials), training, gating (the "
                                           "gate's evaluation after the last step), or finished.")
    started_at: float
    finished_at: float | None
    version: str | None
    reason: str | None
    windows: list[int] = Field(description="The windows it learns (known once the buffer is snapshotted).")
    new_records: int = Field(description="Their training rows.")
    snapshot_seconds: float | None = Field(description="Time taking the buffer's snapshot and the probes' "
                                                       "shortlists (training and gate times are in the gate report "
                                                       "and the version's metadata).")
    ingest_caught_up: bool | None = Field(default=None, description="Whether every ticket on the topic when the "
                                          "update began was stored before its snapshot (false: "
                                          "`kafka.catch_up_timeout_s` ran out first); none without a broker.")
    progress: TrainingProgress | None = Field(description="Training as its process last reported it (gating "
                                                          "follows the last step); none before the first step.")
    search: SearchReport | None = Field(default=None, description="The hyperparameter search's trials and winner "
                                                                  "(`hpo.trials` ≥ 2), once it finished.")


class UpdatePublic(UpdateFields):
    """An update with its whole gate report."""

    gate: GateReport | None = Field(description="The gate's report on the candidate, once judged.")


class UpdateSummary(UpdateFields):
    """An update as a listing shows it: its gate report without the per-window figures, which
    `GET /v1/updates/{id}` serves."""

    gate: GateSummary | None = Field(description="A summary of the gate's report on the candidate, once judged.")


def _fields(record: UpdateRecord) -> dict[str, Any]:
    # Not `asdict`: it deep-copies the gate report, which grows with the windows.
    return {field.name: getattr(record, field.name) for field in fields(record)}


def _public(record: UpdateRecord) -> UpdatePublic:
    return UpdatePublic(**_fields(record))


def _summary(record: UpdateRecord) -> UpdateSummary:
    values = _fields(record)  # the gate once: the update's thread may set it meanwhile
    gate = values.pop("gate")
    return UpdateSummary(**values, gate=None if gate is None else GateSummary.of(gate))


def _unknown(update_id: int) -> HTTPException:
    return HTTPException(status.HTTP_404_NOT_FOUND,
                         f"no update {update_id} (the newest `registry.keep_updates` updates are kept)")


@router.post("/updates", status_code=status.HTTP_202_ACCEPTED, responses=responses(401, 403, 409))
def trigger_update(*, service: ServiceDep, _admin: AdminDep, _primary: PrimaryDep) -> UpdatePublic:
    """Close the open window and start an update now (409 while one is running)."""
    try:
        return _public(service.updates.start("manual"))
    except UpdateInProgress as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc


@router.get("/updates")
def list_updates(service: ServiceDep, limit: Annotated[int, Query(ge=1, le=200)] = 50,
                 before: Annotated[int | None, Query(ge=1, description="Only updates with a smaller id: the "
                                                                       "last id of the previous page.")] = None,
                 ) -> list[UpdateSummary]:
    """Updates (the newest `registry.keep_updates`, kept across restarts), newest first, `limit`
    at a time (page on with `before`), each with a summary of its gate report;
    `GET /v1/updates/{id}` serves one with the whole report."""
    newest_first = (r for r in reversed(service.updates.history) if before is None or r.id < before)
    return [_summary(r) for r in itertools.islice(newest_first, limit)]


@router.get("/updates/{update_id}", responses=responses(404))
def get_update(service: ServiceDep, update_id: int) -> UpdatePublic:
    """One update with its whole gate report: every window's scores and every check."""
    record = service.updates.get(update_id)
    if record is None:
        raise _unknown(update_id)
    return _public(record)


@router.post("/updates/{update_id}/cancel", status_code=status.HTTP_202_ACCEPTED,
             responses=responses(401, 403, 404, 409))
def cancel_update(*, service: ServiceDep, _admin: AdminDep, _primary: PrimaryDep, update_id: int) -> UpdatePublic:
    """Stop a running update (409 once it has finished); it ends `cancelled`, nothing published.

    Answers at once: the training process stops at its next step, or is terminated after
    `train.cancel_grace_seconds`; poll `GET /v1/updates/{id}` for the end.
    """
    try:
        return _public(service.updates.cancel(update_id, "cancelled through the API"))
    except KeyError as exc:
        raise _unknown(update_id) from exc
    except UpdateNotRunning as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
