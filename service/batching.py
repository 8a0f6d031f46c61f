"""Micro-batching of concurrent classify requests.

Requests go to a queue; one worker takes everything queued at that moment (up to `max_batch`)
and scores it in one batched pass per (version, label set). A lone request runs at once;
requests that arrive while a batch runs form the next one. The clients of the last batch are one
round trip away from their next request, so the worker expects them back, beside the requests
that came during that batch, and waits up to `max_wait_ms` for them: a sequential client never
waits, and concurrent clients that first arrived out of step (one alone, seven behind it) fall
into one full batch instead of alternating between a small and a large one.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from service.runtime import LIVE, Classification, ModelRuntime

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Request:
    text: str
    labels: tuple[str, ...] | None
    top_k: int
    version: str
    answer: Future[Classification] = field(default_factory=Future)
    arrived: float = field(default_factory=time.monotonic)


class ClassifyBatcher:
    """Front of `ModelRuntime.classify_batch` that merges concurrent requests."""

    def __init__(self, runtime: ModelRuntime, max_batch: int, max_wait_ms: float = 50.0) -> None:
        self.runtime = runtime
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000
        self._last_size = 1
        self._last_end = 0.0  # when the last batch was answered (time.monotonic)
        self.batches = 0  # batches run, and requests in them: their ratio is the mean batch size
        self.requests = 0
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._worker = threading.Thread(target=self._run, name="classify-batcher", daemon=True)
        self._worker.start()

    def classify(self, text: str, labels: Sequence[str] | None = None, top_k: int = 3,
                 version: str = LIVE) -> Classification:
        request = _Request(text, tuple(labels) if labels else None, top_k, version)
        self._queue.put(request)
        return request.answer.result()

    def close(self) -> None:
        self._queue.put(None)
        self._worker.join(timeout=10)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            taken, stopping = self._collect(first)
            if stopping:
                self._queue.put(None)  # finish this batch, then stop
            self._last_size = len(taken)
            groups: dict[tuple[str, tuple[str, ...] | None], list[_Request]] = {}
            for request in taken:
                groups.setdefault((request.version, request.labels), []).append(request)
            for (version, labels), group in groups.items():
                self._answer(version, labels, group)
            self._last_end = time.monotonic()

    def _collect(self, first: _Request) -> tuple[list[_Request], bool]:
        """The next batch, and whether `close` was called meanwhile."""
        taken, expect, deadline = [first], 0, 0.0
        while len(taken) < self.max_batch:
            waiting = len(taken) < expect
            try:
                more = (self._queue.get(timeout=max(deadline - time.monotonic(), 0)) if waiting
                        else self._queue.get_nowait())
            except queue.Empty:
                if expect:
                    break
                # All that was queued is taken. Expected: the last batch's clients, and those who
                # arrived while it ran; after a lone request with none behind it, only the one taken.
                early = sum(r.arrived < self._last_end for r in taken)
                expect, deadline = min(self._last_size + early, self.max_batch), time.monotonic() + self.max_wait_s
                continue
            if more is None:
                return taken, True
            taken.append(more)
        return taken, False

    def _answer(self, version: str, labels: tuple[str, ...] | None, group: list[_Request]) -> None:
        try:
            answers = self.runtime.classify_batch([r.text for r in group], labels, [r.top_k for r in group],
                                                  version)
        except Exception as exc:  # each caller gets the error (e.g. NoLabels → 409)
            for request in group:
                request.answer.set_exception(exc)
            return
        self.batches += 1
        self.requests += len(group)
        for request, answer in zip(group, answers, strict=True):
            request.answer.set_result(answer)
