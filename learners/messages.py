"""The messages a training worker (`learners.worker`) writes on stdout, one JSON object a line.

    {"event": "started", "pid": 4711, "threads": 1}
    {"event": "progress", "step": 3, "steps": 40, "loss": 1.9, "penalty": 0.0, "tokens_per_s": 812.5,
     "eta_s": 9.1}
    {"event": "done", "gate": {...}, "train": {...}, "labels": [...]}
    {"event": "cancelled", "reason": "..."} or {"event": "failed", "reason": "..."}

`event` tells them apart; `parse_message` reads a line back into its class.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, TypeAdapter

from learners.reports import TrainingProgress, UpdateOutcome


class StartedMessage(BaseModel):
    event: Literal["started"] = "started"
    pid: int
    threads: int = Field(description="Its torch thread budget (`train.threads`).")


class ProgressMessage(TrainingProgress):
    event: Literal["progress"] = "progress"


class DoneMessage(UpdateOutcome):
    """The candidate is in the draft directory; the gate has judged it."""

    event: Literal["done"] = "done"


class CancelledMessage(BaseModel):
    event: Literal["cancelled"] = "cancelled"
    reason: str


class FailedMessage(BaseModel):
    event: Literal["failed"] = "failed"
    reason: str


WorkerMessage = Annotated[StartedMessage | ProgressMessage | DoneMessage | CancelledMessage | FailedMessage,
                          Field(discriminator="event")]
_MESSAGE: TypeAdapter[WorkerMessage] = TypeAdapter(WorkerMessage)


def parse_message(line: str) -> WorkerMessage:
    """The message on a line of the worker's stdout; a `pydantic.ValidationError` if it is none."""
    return _MESSAGE.validate_json(line)
