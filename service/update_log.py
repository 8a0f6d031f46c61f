"""What an update is, as users see it, and its history kept across restarts, bounded.

Each finished update appends a line to `updates.jsonl` beside the registry: its record without
the gate report, which a published version keeps in its own metadata and which is read back
from there on load. A service that runs for a year keeps only the newest
`registry.keep_updates`, in memory and in the file; the file is rewritten (atomically) when it
holds twice as many, so its size is bounded too.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from learners.reports import GateReport, SearchReport, TrainingProgress
from service.registry import AdapterRegistry, RegistryError, fsync_write

LOG = logging.getLogger(__name__)

# contributed, evaluated: a federated round's fit and evaluation (`service.federated_site`).
UpdateStatus = Literal["running", "promoted", "rejected", "skipped", "cancelled", "failed", "contributed", "evaluated"]
# preparing: waiting for the ingester to store the tickets sent, snapshot, starting the training
# process, loading the model; searching: the trials of the hyperparameter search (`hpo.trials`);
# gating: Fisher, save, gate.
UpdateStage = Literal["preparing", "searching", "training", "gating", "finished"]


@dataclass
class UpdateRecord:
    id: int
    trigger: str
    status: UpdateStatus = "running"
    stage: UpdateStage = "preparing"
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    version: str | None = None
    reason: str | None = None
    windows: list[int] = field(default_factory=list)  # the windows it learns, once snapshotted
    new_records: int = 0  # their training rows
    snapshot_seconds: float | None = None
    ingest_caught_up: bool | None = None  # every ticket sent before it began was stored first; None: no broker
    progress: TrainingProgress | None = None  # as the training process last reported it
    gate: GateReport | None = None
    search: SearchReport | None = None  # the hyperparameter search's trials, when it searched

    def to_json(self) -> dict[str, Any]:
        """The record without its gate report (the version's metadata holds that)."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "gate"}
        values["progress"] = None if self.progress is None else self.progress.model_dump(mode="json")
        values["search"] = None if self.search is None else self.search.model_dump(mode="json")
        return values


class UpdateLog:
    """`updates.jsonl`: finished updates, the newest `keep` of them at least."""

    def __init__(self, path: Path, keep: int) -> None:
        self.path, self.keep = path, keep
        self._lines = 0

    def load(self, registry: AdapterRegistry) -> list[UpdateRecord]:
        """The newest `keep` records, each with its version's gate report where there is one.
        A line that cannot be read (a torn last write) is skipped with a warning."""
        lines = self.path.read_text(encoding="utf-8").splitlines() if self.path.exists() else []
        self._lines = len(lines)
        records = []
        for line in lines[-self.keep:] if self.keep else []:
            try:
                values = json.loads(line)
                progress, search = values.pop("progress"), values.pop("search", None)
                record = UpdateRecord(**values, progress=None if progress is None
                                      else TrainingProgress.model_validate(progress),
                                      search=None if search is None else SearchReport.model_validate(search))
            except (ValueError, TypeError, ValidationError):
                LOG.warning("skipping an unreadable line of %s", self.path)
                continue
            if record.version is not None:
                try:
                    record.gate = registry.info(record.version).gate
                except RegistryError:
                    pass  # a version removed by hand: the record stands without its report
            records.append(record)
        return records

    def append(self, record: UpdateRecord, newest: list[UpdateRecord]) -> None:
        """Add a finished record; past twice `keep` lines, rewrite the file with `newest` only."""
        self._lines += 1
        if self._lines > 2 * max(self.keep, 1):
            text = "".join(json.dumps(r.to_json()) + "\n" for r in newest if r.finished_at is not None)
            fsync_write(self.path, text.encode("utf-8"))
            self._lines = len(newest)
            return
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record.to_json()) + "\n")
