"""One line on the terminal per event of the loop, as it happens: an update starting, what it
learns, its verdict with the gate's reason, a version going live.

It reads the state the API serves (the updates' records and the registry's live pointer), once
a second, so the update path carries no hooks for it and a slow terminal never slows an update.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping

from learners.reports import WindowScore
from service.core import Service
from service.update_log import UpdateRecord

Say = Callable[[str], None]


def clock(seconds: float) -> str:
    """
    >>> clock(221.4)
    '3:41'
    """
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes}:{rest:02d}"


def accuracy_summary(candidate: Mapping[int, WindowScore], base: Mapping[int, WindowScore],
                     windows: list[int]) -> str:
    """Accuracy on the windows just learned: the candidate's against the untrained base's.

    >>> score = lambda accuracy: WindowScore(accuracy=accuracy, loss=1.0, n=20)
    >>> accuracy_summary({1: score(0.95)}, {1: score(0.3)}, [1])
    'window 1: 0.95 (base model 0.30)'
    """
    parts = []
    for w in windows:
        if w in candidate:
            parts.append(f"window {w}: {candidate[w].accuracy:.2f}"
                         + (f" (base model {base[w].accuracy:.2f})" if w in base else ""))
    return ", ".join(parts)


class Narrator:
    """Tells the loop's events through `say`, one line each, timed from its start."""

    def __init__(self, service: Service, say: Say, started: float | None = None) -> None:
        self.service = service
        self.say = say
        self.started = time.monotonic() if started is None else started  # a `time.monotonic()` reading
        self._told: dict[int, set[str]] = {}  # events already told, per update
        self._live = service.registry.live
        self._lock = threading.Lock()  # the narrator's thread and the demo's both tick

    def tell(self, line: str) -> None:
        self.say(f"[{clock(time.monotonic() - self.started):>5}] {line}")

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(1.0):
            self.tick()

    def tick(self) -> None:
        """Tell whatever happened since the last tick."""
        with self._lock:
            for record in list(self.service.updates.history):
                self._update_events(record, self._told.setdefault(record.id, set()))
            live = self.service.registry.live
            if live is not None and live != self._live:
                self._live = live
                labels = self.service.registry.info(live).labels
                self.tell(f"{live} is live: /v1/classify now answers among its {len(labels)} learned labels")

    def _update_events(self, record: UpdateRecord, told: set[str]) -> None:
        if "started" not in told:
            told.add("started")
            self.tell(f"update {record.id} started ({record.trigger}): the open window is closed")
        if record.stage == "searching" and record.progress and "searching" not in told:
            told.add("searching")
            self.tell(f"update {record.id} searches window {', '.join(map(str, record.windows))}: "
                      f"{record.progress.trials} trials of its training settings")
        if record.windows and record.stage not in ("preparing", "searching") and "learning" not in told:
            told.add("learning")
            steps = record.progress.steps if record.progress else 0
            self.tell(f"update {record.id} learns window {', '.join(map(str, record.windows))}: "
                      f"{record.new_records} tickets" + (f", {steps} steps" if steps else ""))
        if record.status != "running" and "finished" not in told:
            told.add("finished")
            took = clock((record.finished_at or time.time()) - record.started_at)
            version = f" {record.version}" if record.version else ""
            line = f"update {record.id} {record.status.upper()}{version} after {took}: {record.reason}"
            if record.gate is not None and record.status == "promoted":
                line += f"; {accuracy_summary(record.gate.candidate, record.gate.base, record.windows)}"
            self.tell(line)
