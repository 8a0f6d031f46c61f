"""This service as a site of a federation: the hub's rounds, called by the site's Flower client
(`service.federation`). Admin key, primary only; adapters travel as safetensors, checked against
the live adapter before anything reads them (`service.federated_site`)."""

from __future__ import annotations

import base64
import binascii
from typing import Annotated

from fastapi import APIRouter, Body, HTTPException, Path, Response, status
from pydantic import BaseModel, Field

from learners.reports import GateReport
from service.deps import AdminDep, PrimaryDep, ServiceDep
from service.errors import responses
from service.federated_site import BadWeights, FitReply, RoundRefused
from service.update_manager import UpdateInProgress

router = APIRouter(prefix="/v1/federation", tags=["federation"])
Weights = Annotated[bytes, Body(media_type="application/octet-stream",
                                description="Adapter weights as a safetensors file, the live adapter's tensors.")]
Round = Annotated[int, Path(ge=1, description="The hub's round number.")]
ERRORS = responses(400, 401, 403, 409, 413)


class FitResponse(FitReply):
    weights: str = Field(description="The trained adapter's safetensors file, base64 (empty when it did not train).")


class Adoption(BaseModel):
    weights: str = Field(description="The candidate's safetensors file, base64.")
    gate: GateReport = Field(description="The hub's gate report on the sites' pooled probes; it must have passed.")


class AdoptionResult(BaseModel):
    update: int
    status: str
    version: str | None
    reason: str | None


def _checked(service: ServiceDep, data: bytes) -> bytes:
    if len(data) > service.settings.federation.max_weights_bytes:
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, f"{len(data)} bytes of weights, over "
                            f"federation.max_weights_bytes {service.settings.federation.max_weights_bytes}")
    return data


def _refused(exc: Exception) -> HTTPException:
    if isinstance(exc, BadWeights):
        return HTTPException(status.HTTP_400_BAD_REQUEST, f"weights refused: {exc}")
    return HTTPException(status.HTTP_409_CONFLICT, str(exc))


@router.get("/weights", response_class=Response, responses=responses(401, 403, 409))
def live_weights(*, service: ServiceDep, _admin: AdminDep, _primary: PrimaryDep) -> Response:
    """The live adapter's weights (safetensors), the version's name in `X-Evergreen-Version`."""
    try:
        name, data = service.federated_site.live_weights()
    except RoundRefused as exc:
        raise _refused(exc) from exc
    return Response(data, media_type="application/octet-stream", headers={"X-Evergreen-Version": name})


@router.post("/rounds/{round_number}/fit", responses=ERRORS)
def fit(*, service: ServiceDep, _admin: AdminDep, _primary: PrimaryDep, round_number: Round,
        weights: Weights) -> FitResponse:
    """Train this site's new window and replay from the hub's global adapter (an update of its own,
    under `train.privacy` when set); answers when done, with the trained adapter's weights."""
    try:
        reply, trained = service.federated_site.fit(round_number, _checked(service, weights))
    except (BadWeights, RoundRefused, UpdateInProgress) as exc:
        raise _refused(exc) from exc
    return FitResponse(**dict(reply), weights=base64.b64encode(trained).decode())


@router.post("/rounds/{round_number}/evaluate", response_class=Response, responses=ERRORS)
def evaluate(*, service: ServiceDep, _admin: AdminDep, _primary: PrimaryDep, round_number: Round,
             weights: Weights) -> Response:
    """Gate the hub's candidate on this site's probes of the round, against the live version: the
    per-probe results (`learners.federated.SiteScores`, JSON with `-Infinity` for unscored labels)."""
    try:
        scores = service.federated_site.evaluate(round_number, _checked(service, weights))
    except (BadWeights, RoundRefused, UpdateInProgress) as exc:
        raise _refused(exc) from exc
    return Response(scores.model_dump_json(), media_type="application/json")


@router.post("/rounds/{round_number}/adopt", responses=ERRORS)
def adopt(*, service: ServiceDep, _admin: AdminDep, _primary: PrimaryDep, round_number: Round,
          adoption: Adoption) -> AdoptionResult:
    """Publish and promote the candidate the hub's pooled gate passed."""
    try:
        data = base64.b64decode(adoption.weights, validate=True)
    except binascii.Error as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"weights are not base64: {exc}") from exc
    try:
        record = service.federated_site.adopt(round_number, _checked(service, data), adoption.gate)
    except (BadWeights, RoundRefused, UpdateInProgress) as exc:
        raise _refused(exc) from exc
    return AdoptionResult(update=record.id, status=record.status, version=record.version, reason=record.reason)
