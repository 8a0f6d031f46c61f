"""Turns at the model: a lock granted in order of arrival, whose holder can let others go first.

One request computes at a time (on a few cores two would only slow each other down), but a long
request must not hold the model for its whole run. A classify steps aside after each slice of its
prompt and each chunk of its labels; a generation after each slice of a long prompt, then between
tokens once its turn has lasted `serving.turn_ms`. A small request thus waits for one turn of a
large one, not for all of it. `threading.Lock` cannot do that: it is not fair, and a thread that
releases and takes it again usually gets it back before any waiter wakes.

>>> turns = TurnLock()
>>> with turns:
...     turns.waiting
0
>>> turns.step_aside()  # nobody waits: a no-op
False
"""

from __future__ import annotations

import threading
import time
from types import TracebackType


class TurnLock:
    """A ticket lock: `acquire` takes a number and waits until it is served."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._next = 0  # the number the next arrival takes
        self._serving = 0  # the number that holds the lock (or may take it)
        self.steps_aside = 0  # times a holder let others go first
        self._since = 0.0  # when the holder got its turn (time.monotonic)

    @property
    def waiting(self) -> int:
        """Threads waiting for a turn behind the holder."""
        with self._changed:
            return max(self._next - self._serving - 1, 0)

    def acquire(self) -> None:
        with self._changed:
            ticket = self._next
            self._next += 1
            self._changed.wait_for(lambda: self._serving == ticket)
        self._since = time.monotonic()

    def release(self) -> None:
        with self._changed:
            self._serving += 1
            self._changed.notify_all()

    def step_aside(self, after_s: float = 0.0) -> bool:
        """Called by the holder: if it has had the lock for `after_s` seconds, let every thread
        waiting now take its turn, then resume. Returns whether anyone did."""
        if time.monotonic() - self._since < after_s or not self.waiting:
            return False
        self.steps_aside += 1
        self.release()
        self.acquire()
        return True

    def __enter__(self) -> TurnLock:
        self.acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.release()
