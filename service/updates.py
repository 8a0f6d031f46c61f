"""Running updates: snapshot the buffer, train and gate a candidate, register it, promote it.

The API's `POST /v1/updates` and the scheduler both call `UpdateManager.start`; only one update
runs at a time. A crash or error anywhere leaves the live version untouched: the candidate
directory is published only when complete, and the pointer moves only after the gate passes.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from learners.config import GateSettings, TrainSettings
from learners.train import Cancelled, Progress
from learners.update import initial_adapter, train_candidate
from replay.buffer import ReplayBuffer
from service.forgetting import AccuracyMatrix, best_before
from service.registry import AdapterRegistry, Draft
from service.runtime import ModelRuntime

LOG = logging.getLogger(__name__)

UpdateStatus = Literal["running", "promoted", "rejected", "skipped", "cancelled", "failed"]


class UpdateInProgress(Exception):
    """Another update is running; updates never overlap."""


@dataclass
class UpdateRecord:
    id: int
    trigger: str
    status: UpdateStatus = "running"
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    version: str | None = None
    reason: str | None = None
    progress: dict[str, float] = field(default_factory=dict)
    gate: dict[str, Any] | None = None


class UpdateManager:
    """Owns the update lifecycle and the history of updates of this process."""

    def __init__(self, buffer: ReplayBuffer, registry: AdapterRegistry, matrix: AccuracyMatrix,
                 base_path: Path, train: TrainSettings, gate: GateSettings) -> None:
        self.buffer = buffer
        self.registry = registry
        self.matrix = matrix
        self.base_path = base_path
        self.train = train
        self.gate = gate
        self.runtime: ModelRuntime | None = None
        self.history: list[UpdateRecord] = []
        self._ids = itertools.count(1)
        self._running = threading.Lock()
        self._thread: threading.Thread | None = None
        self._cancel = threading.Event()

    def ensure_initial_version(self) -> str:
        """The registry's first version (an untrained adapter) when it has none; the live name."""
        if self.registry.live is None:
            def write(tmp: Path) -> Draft:
                initial_adapter(self.base_path, tmp, self.train.adapter, self.train.seed)
                return Draft(parent=None, verdict="accepted", windows_trained=[], labels=[])

            self.registry.promote(self.registry.create(write).name)
        live = self.registry.live
        assert live is not None
        return live

    @property
    def busy(self) -> bool:
        return self._running.locked()

    def start(self, trigger: str) -> UpdateRecord:
        """Start an update in the background; raises UpdateInProgress if one is running."""
        if not self._running.acquire(blocking=False):
            raise UpdateInProgress("an update is already running")
        record = UpdateRecord(id=next(self._ids), trigger=trigger)
        self.history.append(record)
        self._thread = threading.Thread(target=self._run, args=(record,), name=f"update-{record.id}",
                                        daemon=True)
        self._thread.start()
        return record

    def cancel_and_wait(self, timeout: float | None = None) -> None:
        """Stop a running update at its next step (its candidate is discarded) and wait for it."""
        self._cancel.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._cancel.clear()

    def get(self, update_id: int) -> UpdateRecord | None:
        return next((r for r in self.history if r.id == update_id), None)

    def _run(self, record: UpdateRecord) -> None:
        try:
            self._update(record)
        except Cancelled as exc:
            LOG.info("update %d cancelled: %s", record.id, exc)
            record.status, record.reason = "cancelled", str(exc)
        except Exception as exc:  # the service keeps serving; the failure is reported
            LOG.exception("update %d failed", record.id)
            record.status, record.reason = "failed", f"{type(exc).__name__}: {exc}"
        finally:
            record.finished_at = time.time()
            self._running.release()

    def _update(self, record: UpdateRecord) -> None:
        self.buffer.close_window()
        live = self.ensure_initial_version()
        live_info = self.registry.info(live)
        snapshot = self.buffer.snapshot(live_info.windows_trained, seed=self.train.seed + record.id)
        if not any(r.label for r in snapshot.new):
            record.status, record.reason = "skipped", "no new labelled records since the live version"
            return

        first_step: list[float] = []  # when step 1 ended: the steps after it set the pace

        def on_progress(p: Progress) -> None:
            now = time.monotonic()
            first_step[:] = first_step or [now]
            progress = {"step": p.step, "steps": p.steps, "loss": p.loss,
                        "penalty": p.penalty, "tokens_per_s": p.tokens_per_s}
            if p.step > 1:  # training time left only: the gate's evaluation follows it
                progress["eta_s"] = (now - first_step[0]) / (p.step - 1) * (p.steps - p.step)
            record.progress = progress

        def write(tmp: Path) -> Draft:
            outcome = train_candidate(snapshot, self.base_path, self.registry.path(live), tmp,
                                      self.train, self.gate, on_progress, self._cancel,
                                      best_before(self.registry, self.matrix, live))
            return Draft(parent=live, verdict="accepted" if outcome.gate.passed else "rejected",
                         windows_trained=sorted({*live_info.windows_trained, *snapshot.new_windows}),
                         labels=list(outcome.labels), gate=outcome.gate.to_json(),
                         train=asdict(outcome.train))

        info = self.registry.create(write)
        assert info.gate is not None
        self.matrix.record_gate(info.name, live, info.gate)
        record.version, record.gate = info.name, info.gate
        record.reason = info.gate["reason"] if info.gate else None
        if info.verdict == "rejected":
            record.status = "rejected"
            return
        # Swap first: it refuses unsafe weights before the pointer could name them.
        if self.runtime is not None:
            self.runtime.swap(info.name)
        self.registry.promote(info.name)
        record.status = "promoted"
