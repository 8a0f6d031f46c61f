"""The persisted accuracy matrix (versions × windows) and the forgetting figures drawn from it.

Every gate measures the candidate, the live version and the base model on the probe sets;
each measurement lands here (`accuracy.json` beside the registry, written atomically). A
serve-only replica shares the file with the primary that writes it, so readers re-read it
whenever it has been replaced since they last looked. A
version's figures follow its training lineage: the chain of parents it was warm-started from.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from learners.metrics import Row, summarize
from learners.reports import GateReport, WindowScore
from service.registry import AdapterRegistry, VersionInfo, fsync_write

BASE = "base"


class AccuracyMatrix:
    """`R[version][window] = {"accuracy", "loss", "n"}`, plus a `base` row for the base model."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._cells: dict[str, dict[str, dict[str, float]]] = {}
        self._seen: tuple[int, int, int] | None = None  # the file as last read or written
        self.refresh()

    def _signature(self) -> tuple[int, int, int] | None:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return None
        # Writes replace the file (a new inode), so this changes even where mtimes are coarse.
        return stat.st_ino, stat.st_mtime_ns, stat.st_size

    def refresh(self, force: bool = False) -> None:
        """Re-read the file if another process has rewritten it since (or always, with `force`)."""
        with self._lock:
            seen = self._signature()  # before reading: a write in between is caught next time
            if seen is None or (seen == self._seen and not force):
                return
            self._cells = json.loads(self.path.read_text())
            self._seen = seen

    def record(self, version: str, scores: Mapping[int, WindowScore]) -> None:
        """Add or refresh a version's cells: a window's cell is from the latest gate that scored it
        (`n` probes: with `gate.probe_budget`, an earlier window's share of its probe set)."""
        with self._lock:
            row = self._cells.setdefault(version, {})
            row.update({str(w): s.model_dump(mode="json", include={"accuracy", "loss", "n"})
                        for w, s in scores.items()})
            fsync_write(self.path, json.dumps(self._cells, indent=1).encode())
            self._seen = self._signature()

    def record_gate(self, candidate: str, live: str, gate: GateReport) -> None:
        self.record(candidate, gate.candidate)
        self.record(live, gate.live)
        self.record(BASE, gate.base)

    def accuracy(self, version: str) -> dict[int, float]:
        with self._lock:
            return {int(w): c["accuracy"] for w, c in self._cells.get(version, {}).items()}

    def windows(self) -> list[int]:
        with self._lock:
            return sorted({int(w) for row in self._cells.values() for w in row})


def lineage(registry: AdapterRegistry, version: str) -> list[VersionInfo]:
    """The version and the parents it was warm-started from, oldest first."""
    chain = []
    name: str | None = version
    while name is not None:
        info = registry.info(name)
        chain.append(info)
        name = info.parent
    return chain[::-1]


def rows_for(registry: AdapterRegistry, matrix: AccuracyMatrix, version: str) -> list[Row]:
    return [Row(info.name, frozenset(info.windows_trained), matrix.accuracy(info.name))
            for info in lineage(registry, version)]


def best_before(registry: AdapterRegistry, matrix: AccuracyMatrix, version: str) -> dict[int, float]:
    """Each window's best accuracy along `version`'s lineage, once trained: the forgetting
    reference the gate holds a candidate of `version` to."""
    best: dict[int, float] = {}
    for row in rows_for(registry, matrix, version):
        for window in row.trained:
            if window in row.accuracy:
                best[window] = max(best.get(window, 0.0), row.accuracy[window])
    return best


def report(registry: AdapterRegistry, matrix: AccuracyMatrix) -> dict[str, Any]:
    """The matrix and, for every version, its figures along its own lineage."""
    matrix.refresh()
    base = matrix.accuracy(BASE)
    live = registry.live
    versions = []
    for name in registry.names():
        info = registry.info(name)
        summary = summarize(rows_for(registry, matrix, name), base)[-1]
        versions.append({
            "name": name, "parent": info.parent, "verdict": info.verdict, "live": name == live,
            "pruned": info.pruned_at is not None,
            "windows_trained": info.windows_trained,
            "accuracy": {str(w): a for w, a in sorted(matrix.accuracy(name).items())},
            "summary": {**asdict(summary), "forgetting": {str(w): f for w, f in summary.forgetting.items()}},
        })
    return {"windows": matrix.windows(), "live": live, "base": {str(w): a for w, a in sorted(base.items())},
            "versions": versions}
