"""Micro-batching of concurrent classify requests, with a fair share of the model for each.

Requests go to a queue; one worker takes everything queued at that moment (up to `max_batch`)
and scores each (version, label set) group in batched passes. A lone request runs at once;
requests that arrive while a batch runs form the next one. The clients of the last batch are one
round trip away from their next request, so the worker expects them back, beside the requests
that came during that batch, and waits up to `max_wait_ms` for them: a sequential client never
waits, and concurrent clients that first arrived out of step (one alone, seven behind it) fall
into one full batch instead of alternating between a small and a large one.

Fair share: a group's labels are scored `chunk_tokens` label tokens at a time, and the groups in
progress take turns, one chunk each (round robin), with new requests joining the rotation as
they arrive. A request with a thousand labels thus costs the small requests behind it at most
one chunk per turn, not its whole run: softmax over the concatenated chunk scores gives the
same answer as one pass over every label.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from service.runtime import LIVE, Classification, Loaded, ModelRuntime, rank

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Request:
    text: str
    labels: tuple[str, ...] | None
    top_k: int
    version: str
    answer: Future[Classification] = field(default_factory=Future)
    arrived: float = field(default_factory=time.monotonic)


@dataclass
class _Job:
    """A group of requests scored together: one version, one label set, one chunk per turn."""

    requests: list[_Request]
    run: Loaded
    candidates: list[str]
    chunks: deque[list[str]]  # label chunks still to score
    scores: list[torch.Tensor] = field(default_factory=list)  # texts × chunk, per chunk scored


def label_chunks(labels: Sequence[str], tokens: Sequence[int], budget: int) -> deque[list[str]]:
    """Consecutive runs of labels of at most `budget` tokens each (a longer label alone).

    >>> label_chunks(["a", "b", "c", "d"], [2, 2, 3, 1], budget=4)
    deque([['a', 'b'], ['c', 'd']])
    """
    chunks: deque[list[str]] = deque([[]])
    used = 0
    for label, count in zip(labels, tokens, strict=True):
        if chunks[-1] and used + count > budget:
            chunks.append([])
            used = 0
        chunks[-1].append(label)
        used += count
    return chunks


class ClassifyBatcher:
    """Front of `ModelRuntime` that merges concurrent requests and shares the model fairly."""

    def __init__(self, runtime: ModelRuntime, max_batch: int, max_wait_ms: float = 50.0,
                 chunk_tokens: int = 1024) -> None:
        self.runtime = runtime
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000
        self.chunk_tokens = chunk_tokens
        self._last_size = 1
        self._last_end = 0.0  # when the last batch was answered (time.monotonic)
        self.batches = 0  # groups answered, and requests in them: their ratio is the mean batch size
        self.requests = 0
        self.in_progress = 0  # requests taken from the queue and not yet answered
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
        jobs: deque[_Job] = deque()
        stopping = False
        while not (stopping and not jobs):
            if not stopping:
                if jobs:  # work in progress: take what is queued now, wait for nothing
                    taken, stopping = self._drain()
                else:
                    first = self._queue.get()
                    if first is None:
                        return
                    taken, stopping = self._collect(first)
                    self._last_size = len(taken)
                jobs.extend(self._start(taken))
                self.in_progress = sum(len(j.requests) for j in jobs)
            if jobs:
                job = jobs.popleft()
                if self._step(job):
                    jobs.append(job)  # its next chunk waits for every other group's turn
                else:
                    self.in_progress -= len(job.requests)

    def _drain(self) -> tuple[list[_Request], bool]:
        taken: list[_Request] = []
        while True:
            try:
                more = self._queue.get_nowait()
            except queue.Empty:
                return taken, False
            if more is None:
                return taken, True
            taken.append(more)

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

    def _start(self, taken: list[_Request]) -> list[_Job]:
        """Group requests by (version, labels); fix each group's version and label chunks."""
        groups: dict[tuple[str, tuple[str, ...] | None], list[_Request]] = {}
        for request in taken:
            groups.setdefault((request.version, request.labels), []).append(request)
        jobs = []
        for (version, labels), group in groups.items():
            try:
                run, candidates = self.runtime.resolve(labels, version)
                chunks = label_chunks(candidates, self.runtime.label_tokens(candidates), self.chunk_tokens)
            except Exception as exc:  # each caller gets the error (e.g. NoLabels → 409)
                self._fail(group, exc)
                continue
            jobs.append(_Job(group, run, candidates, chunks))
        return jobs

    def _step(self, job: _Job) -> bool:
        """Score the job's next chunk; answer it after the last one. Whether chunks remain."""
        try:
            job.scores.append(self.runtime.score(job.run, [r.text for r in job.requests], job.chunks.popleft()))
            if job.chunks:
                return True
            answers = rank(job.run.version, job.candidates, torch.cat(job.scores, dim=1),
                           [r.top_k for r in job.requests])
        except Exception as exc:
            self._fail(job.requests, exc)
            return False
        self.batches += 1
        self.requests += len(job.requests)
        for request, answer in zip(job.requests, answers, strict=True):
            request.answer.set_result(answer)
        self._last_end = time.monotonic()
        return False

    @staticmethod
    def _fail(requests: list[_Request], exc: Exception) -> None:
        for request in requests:
            request.answer.set_exception(exc)
