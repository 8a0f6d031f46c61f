from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel

from service.deps import ServiceDep

router = APIRouter(prefix="/v1", tags=["buffer"])


class WindowPublic(BaseModel):
    id: int
    closed: bool
    train_size: int
    probe_size: int
    labels: list[str]


class BufferPublic(BaseModel):
    records: int
    pending: int
    windows: list[WindowPublic]
    dead_lettered: dict[str, int]


@router.get("/buffer")
def buffer_summary(service: ServiceDep) -> BufferPublic:
    """Replay buffer size, windows with their train/probe split, and dead-letter counts."""
    stats = service.ingester.stats.dead_lettered if service.ingester else {}
    return BufferPublic(
        records=len(service.buffer), pending=service.buffer.pending(),
        windows=[WindowPublic(id=w.id, closed=w.closed, train_size=w.train_size,
                              probe_size=w.probe_size, labels=list(w.labels))
                 for w in service.buffer.windows()],
        dead_lettered=dict(stats),
    )
