from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Response, status
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from service.deps import ServiceDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


IngestStatus = Literal["ok", "stalled", "off"]


class IngestHealth(BaseModel):
    status: IngestStatus = Field(description="`stalled`: no offset committed for `kafka.stall_after_s` while "
                                             "records wait, or the broker could not be read; `off`: this "
                                             "instance does not consume Kafka.")
    seconds_since_progress: float | None = Field(description="Since an offset was last committed or nothing "
                                                             "was left to read.")
    stall_after_s: float


def ingest_status(service: ServiceDep) -> IngestStatus:
    if service.ingester is None:
        return "off"
    return "stalled" if service.ingester.stalled else "ok"


@router.get("/readyz")
def readyz(service: ServiceDep) -> dict[str, str]:
    """The model is loaded and answering (`ingest` reports ingestion, see `/healthz/ingest`:
    serving does not depend on it, so a stalled ingester does not make the instance unready)."""
    return {"status": "ready", "adapter_version": service.runtime.version, "ingest": ingest_status(service)}


@router.get("/healthz/ingest", responses={503: {"model": IngestHealth, "description": "Ingestion is stalled."}})
def ingest_health(service: ServiceDep, response: Response) -> IngestHealth:
    """Whether ingestion moves: 503 when it is stalled, for an alert or a liveness probe."""
    state = ingest_status(service)
    if state == "stalled":
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    ingester = service.ingester
    return IngestHealth(status=state, seconds_since_progress=ingester.stalled_seconds if ingester else None,
                        stall_after_s=service.settings.kafka.stall_after_s)


@router.get("/metrics", response_class=Response)
def metrics(service: ServiceDep) -> Response:
    """Prometheus metrics."""
    return Response(generate_latest(service.metrics_registry), media_type=CONTENT_TYPE_LATEST)
