from __future__ import annotations

from fastapi import APIRouter

from service.deps import ServiceDep
from service.privacy import PrivacyStatus

router = APIRouter(prefix="/v1", tags=["privacy"])


@router.get("/privacy")
def privacy_status(service: ServiceDep) -> PrivacyStatus:
    """ε spent by the differentially private updates (`train.privacy`), each round entered, the
    budget, and why the last update was refused by it, if it was."""
    return service.updates.privacy.status()
