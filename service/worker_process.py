"""The serving side of a training process (`learners.worker`): start it, read it, stop it.

Training runs in a child process so that it has its own torch thread pool and memory and the
serving process keeps answering; a crash of the child cannot take the service down with it.
The child is started ahead of its update, as a spare (`spawn_spare`), so that an update does not
wait for its imports.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from pydantic import ValidationError

from learners.messages import WorkerMessage, parse_message
from learners.worker import CANCEL, Job

LOG = logging.getLogger(__name__)


class TrainingFailed(Exception):
    """The training process failed or died before reporting an outcome."""


def spawn_spare() -> subprocess.Popen[str]:
    """A `python -m learners.worker` child: it imports everything, then waits for a job.

    It inherits the environment (so `PYTHONPATH` and the settings variables) and stderr (so its
    log lines appear in the service's log).
    """
    return subprocess.Popen([sys.executable, "-m", "learners.worker"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def discard(spare: subprocess.Popen[str]) -> None:
    """End a spare that never got a job: closing its stdin makes it exit; killed if it lingers."""
    assert spare.stdin is not None and spare.stdout is not None
    try:
        spare.stdin.close()
    except OSError:
        pass
    try:
        spare.wait(timeout=5)
    except subprocess.TimeoutExpired:
        spare.kill()
        spare.wait()
    spare.stdout.close()


class TrainingProcess:
    """A training child running one job; its stdout messages are read by one thread.

    `spare`: a child from `spawn_spare` to hand the job to; a fresh one is started when there is
    none or it has died.
    """

    def __init__(self, job: Job, job_file: Path, grace_seconds: float,
                 spare: subprocess.Popen[str] | None = None) -> None:
        job_file.write_text(job.model_dump_json())
        self.grace_seconds = grace_seconds
        self._proc = self._handed(spare, job_file) if spare is not None else None
        if self._proc is None:
            self._proc = self._handed(spawn_spare(), job_file)
            if self._proc is None:
                raise TrainingFailed("the training process exited before it could be given its job")
        self._stop_timer: threading.Timer | None = None
        self._lock = threading.Lock()

    @staticmethod
    def _handed(child: subprocess.Popen[str], job_file: Path) -> subprocess.Popen[str] | None:
        """`child`, given the job; None if it has died (a spare killed while it waited)."""
        assert child.stdin is not None
        try:
            child.stdin.write(f"{job_file}\n")
            child.stdin.flush()
        except OSError:
            LOG.warning("spare training process %d is gone (%s): starting another", child.pid, child.poll())
            discard(child)
            return None
        return child

    @property
    def pid(self) -> int:
        return self._proc.pid

    def messages(self) -> Iterator[WorkerMessage]:
        """The child's messages as they come, until it closes stdout (exits or dies)."""
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            try:
                yield parse_message(line)
            except ValidationError:
                LOG.warning("training process %d wrote a line that is not a message: %.200s", self.pid, line)

    def cancel(self) -> None:
        """Ask the child to stop at its next step; terminate it if it has not after the grace period."""
        with self._lock:
            if self._stop_timer is not None or self._proc.poll() is not None:
                return
            try:
                assert self._proc.stdin is not None
                self._proc.stdin.write(CANCEL + "\n")
                self._proc.stdin.flush()
            except OSError:  # it is exiting already; wait() will tell how
                pass
            self._stop_timer = threading.Timer(self.grace_seconds, self._terminate)
            self._stop_timer.daemon = True
            self._stop_timer.start()

    def _terminate(self) -> None:
        if self._proc.poll() is None:
            LOG.warning("training process %d did not stop within %.0f s of a cancel: terminating",
                        self.pid, self.grace_seconds)
            self._proc.terminate()

    def wait(self) -> int:
        """Reap the child (after `messages` ended); its exit status, negative for a signal."""
        code = self._proc.wait()
        with self._lock:
            if self._stop_timer is not None:
                self._stop_timer.cancel()
            assert self._proc.stdin is not None and self._proc.stdout is not None
            self._proc.stdin.close()
            self._proc.stdout.close()
        return code


def describe_exit(code: int) -> str:
    if code < 0:
        return f"the training process was killed by {signal.Signals(-code).name}"
    return f"the training process exited with status {code} without an outcome (see the service log)"
