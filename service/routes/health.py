from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.deps import ServiceDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(service: ServiceDep) -> dict[str, str]:
    """The model is loaded and answering."""
    return {"status": "ready", "adapter_version": service.runtime.version}


@router.get("/metrics", response_class=Response)
def metrics(service: ServiceDep) -> Response:
    """Prometheus metrics."""
    return Response(generate_latest(service.metrics_registry), media_type=CONTENT_TYPE_LATEST)
