"""The persisted accuracy matrix (versions × windows) and the forgetting figures drawn from it.

Every gate measures the candidate, the live version and the base model on the probe sets (and,
where tickets carry replies, candidate and live on earlier windows' reply probes: a cell's
`reply`); each measurement lands here (`accuracy.json` beside the registry, written atomically). A
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

from learners.accuracy_matrix import Prefix, Row, step
from learners.reports import GateReport, ReplyScore, WindowScore
from service.registry import AdapterRegistry, Entry, Signature, file_signature, fsync_write

BASE = "base"


class AccuracyMatrix:
    """`R[version][window] = {"accuracy", "loss", "n"}`, plus a `base` row for the base model; a
    cell of a window with reply probes also holds `reply: {"loss", "rouge_l", "matched", "n",
    "answered"}` (`learners.reports.ReplyScore`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._cells: dict[str, dict[str, dict[str, float]]] = {}
        self._seen: Signature | None = None  # the file as last read or written
        self.refresh()

    def refresh(self, force: bool = False) -> None:
        """Re-read the file if another process has rewritten it since (or always, with `force`)."""
        with self._lock:
            seen = file_signature(self.path)  # before reading: a write in between is caught next time
            if seen is None or (seen == self._seen and not force):
                return
            self._cells = json.loads(self.path.read_text())
            self._seen = seen

    def record(self, version: str, scores: Mapping[int, WindowScore]) -> None:
        """Add or refresh a version's cells: a window's cell is from the latest gate that scored it
        (`n` probes: with `gate.probe_budget`, an earlier window's share of its probe set)."""
        self.record_rows({version: scores})

    def record_gate(self, candidate: str, live: str, gate: GateReport) -> None:
        self.record_rows({candidate: gate.candidate, live: gate.live, BASE: gate.base},
                         {candidate: gate.replies_candidate, live: gate.replies_live})

    def record_rows(self, rows: Mapping[str, Mapping[int, WindowScore]],
                    replies: Mapping[str, Mapping[int, ReplyScore]] | None = None) -> None:
        """Several versions' cells in one write: the file is rewritten whole, so once per gate."""
        with self._lock:
            for version, scores in rows.items():
                row = self._cells.setdefault(version, {})
                for w, score in scores.items():
                    row.setdefault(str(w), {}).update(score.model_dump(mode="json", include={"accuracy", "loss", "n"}))
            for version, answers in (replies or {}).items():
                row = self._cells.setdefault(version, {})
                for w, reply in answers.items():
                    row.setdefault(str(w), {})["reply"] = reply.model_dump(mode="json")
            fsync_write(self.path, json.dumps(self._cells, separators=(",", ":")).encode())
            self._seen = file_signature(self.path)

    def accuracy(self, version: str) -> dict[int, float]:
        with self._lock:
            return {int(w): c["accuracy"] for w, c in self._cells.get(version, {}).items() if "accuracy" in c}

    def replies(self, version: str) -> dict[int, dict[str, Any]]:
        """The version's reply cells, by window (none where no probe carried a reply)."""
        with self._lock:
            return {int(w): c["reply"] for w, c in self._cells.get(version, {}).items() if "reply" in c}

    def windows(self) -> list[int]:
        with self._lock:
            return sorted({int(w) for row in self._cells.values() for w in row})


def lineage(registry: AdapterRegistry, version: str) -> list[Entry]:
    """The version and the parents it was warm-started from, oldest first."""
    chain = []
    name: str | None = version
    while name is not None:
        entry = registry.entry(name)
        chain.append(entry)
        name = entry.parent
    return chain[::-1]


def _row(matrix: AccuracyMatrix, entry: Entry) -> Row:
    return Row(entry.name, frozenset(entry.windows_trained), matrix.accuracy(entry.name))


def best_before(registry: AdapterRegistry, matrix: AccuracyMatrix, version: str) -> dict[int, float]:
    """Each window's best accuracy along `version`'s lineage, once trained: the forgetting
    reference the gate holds a candidate of `version` to."""
    best: dict[int, float] = {}
    for row in (_row(matrix, entry) for entry in lineage(registry, version)):
        for window in row.trained:
            if window in row.accuracy:
                best[window] = max(best.get(window, 0.0), row.accuracy[window])
    return best


def report(registry: AdapterRegistry, matrix: AccuracyMatrix, limit: int, window_limit: int,
           before: str | None = None) -> dict[str, Any]:
    """The matrix and, for each version, its figures along its own lineage: the newest `limit`
    versions (created before `before`, if given), and the live one wherever it is; cells and
    per-window forgetting of the newest `window_limit` windows. Figures cover every window.

    Each version's figures extend its parent's (`learners.accuracy_matrix.step`), so the whole registry
    costs O(versions × windows), not a walk of every lineage from its root.
    """
    matrix.refresh()
    base = matrix.accuracy(BASE)
    live = registry.live
    shown = set(registry.page(limit, before))
    entries = registry.entries()
    all_windows = matrix.windows()
    windows = all_windows[-window_limit:]
    columns = set(windows)
    prefixes: dict[str | None, Prefix] = {None: Prefix()}
    needed = _ancestors(entries, shown)
    versions = []
    for entry in entries:  # oldest first: a parent is always older than its children
        if entry.name not in needed:
            continue
        row = _row(matrix, entry)
        summary, prefixes[entry.name] = step(prefixes[entry.parent], row, base)
        if entry.name in shown:
            versions.append({
                "name": entry.name, "parent": entry.parent, "verdict": entry.verdict, "live": entry.name == live,
                "pruned": entry.pruned_at is not None, "windows_trained": list(entry.windows_trained),
                "accuracy": {str(w): a for w, a in sorted(row.accuracy.items()) if w in columns},
                "replies": {str(w): c for w, c in sorted(matrix.replies(entry.name).items()) if w in columns},
                "summary": {**asdict(summary),
                            "forgetting": {str(w): f for w, f in summary.forgetting.items() if w in columns}},
            })
    return {"windows": windows, "live": live, "base": {str(w): a for w, a in sorted(base.items()) if w in columns},
            "versions": versions, "versions_total": len(entries), "windows_total": len(all_windows)}


def _ancestors(entries: list[Entry], names: set[str]) -> set[str]:
    """`names` and every version in their lineages."""
    parents = {e.name: e.parent for e in entries}
    found: set[str] = set()
    for name in names:
        current: str | None = name
        while current is not None and current not in found:
            found.add(current)
            current = parents[current]
    return found
