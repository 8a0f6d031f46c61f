"""Micro-batching of concurrent classify requests, with a fair share of the model for each.

Requests go to a queue; one worker takes everything queued at that moment (up to `max_batch`)
and scores each (version, label set) group in batched passes. A lone request runs at once;
requests that arrive while a batch runs form the next one. The clients of the last batch are one
round trip away from their next request, so the worker expects them back, beside the requests
that came during that batch, and waits up to `max_wait_ms` for them: a sequential client never
waits, and concurrent clients that first arrived out of step (one alone, seven behind it) fall
into one full batch instead of alternating between a small and a large one.

Fair share: a group first reads its tickets' prompts, `turn_tokens` prompt tokens per turn, then
scores its labels against them, `turn_tokens` label tokens per turn (the prompts are read once,
`learners.scoring.PromptPass`). The groups in progress take turns (round robin), and new requests
go ahead of the group that just had its turn. A request with a long ticket and hundreds of labels
thus costs a small request behind it one turn, not its whole run: softmax over the concatenated
chunk scores gives the same answer as one pass over every label. Generations take turns on the
same model (`service.turns`).

Shortlists: a request may carry the few candidates worth scoring for its ticket (see
`replay.shortlist`). A group whose requests all carry one scores only the union of their
shortlists, and each answer is ranked among its own shortlist: a label's score does not depend
on the other labels in the pass, so every score is the one a full pass would give it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

import torch

from learners.scoring import PromptPass, with_votes
from service.runtime import LIVE, Classification, Loaded, ModelRuntime, rank

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Request:
    text: str
    labels: tuple[str, ...] | None
    top_k: int
    version: str
    shortlist: tuple[str, ...] | None = None
    votes: Mapping[str, float] = field(default_factory=dict)  # the buffer's vote shares, by label
    answer: Future[Classification] = field(default_factory=Future)
    arrived: float = field(default_factory=time.monotonic)


@dataclass
class _Job:
    """A group of requests scored together: one version, one label set, one chunk per turn."""

    requests: list[_Request]
    run: Loaded
    prompts: PromptPass  # the requests' tickets, read a few columns per turn before any label
    scored: list[str]  # the candidates, or the union of the requests' shortlists
    shortlists: list[list[str]] | None  # per request, the labels it is ranked among; None: all
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
                 turn_tokens: int = 128, vote_weight: float = 0.0) -> None:
        self.runtime = runtime
        self.vote_weight = vote_weight
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000
        self.turn_tokens = turn_tokens
        self._last_size = 1
        self._last_end = 0.0  # when the last batch was answered (time.monotonic)
        self.batches = 0  # groups answered, and requests in them: their ratio is the mean batch size
        self.requests = 0
        self.in_progress = 0  # requests taken from the queue and not yet answered
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._worker = threading.Thread(target=self._run, name="classify-batcher", daemon=True)
        self._worker.start()

    def classify(self, text: str, labels: Sequence[str] | None = None, top_k: int = 3,
                 version: str = LIVE, shortlist: Sequence[str] | None = None,
                 votes: Mapping[str, float] | None = None) -> Classification:
        """The answer among `labels` (default: the version's), or among `shortlist` of them, with
        the buffer's `votes` weighed in (`learners.scoring.with_votes`)."""
        request = _Request(text, tuple(labels) if labels else None, top_k, version,
                           tuple(shortlist) if shortlist else None, dict(votes or {}))
        self._queue.put(request)
        return request.answer.result()

    def close(self) -> None:
        self._queue.put(None)
        self._worker.join(timeout=10)

    def _run(self) -> None:
        jobs: deque[_Job] = deque()
        turned: _Job | None = None  # the job that just had its turn: it goes behind the newcomers
        stopping = False
        while not (stopping and not jobs and turned is None):
            if not stopping:
                if jobs or turned:  # work in progress: take what is queued now, wait for nothing
                    taken, stopping = self._drain()
                else:
                    first = self._queue.get()
                    if first is None:
                        return
                    taken, stopping = self._collect(first)
                    self._last_size = len(taken)
                jobs.extend(self._start(taken))
            if turned is not None:
                jobs.append(turned)
                turned = None
            self.in_progress = sum(len(j.requests) for j in jobs)
            if jobs:
                job = jobs.popleft()
                if self._step(job):
                    turned = job
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
                shortlists = _within(candidates, [r.shortlist for r in group])
                scored = (candidates if shortlists is None
                          else list(dict.fromkeys(label for own in shortlists for label in own)))
                chunks = label_chunks(scored, self.runtime.label_tokens(scored), self.turn_tokens)
                prompts = self.runtime.read(run, [r.text for r in group])
            except Exception as exc:  # each caller gets the error (e.g. NoLabels → 409)
                self._fail(group, exc)
                continue
            jobs.append(_Job(group, run, prompts, scored, shortlists, chunks))
        return jobs

    def _step(self, job: _Job) -> bool:
        """One turn of the job: `turn_tokens` of its prompts while more than that is left unread,
        else its next label chunk (with what is left of the prompts, in one pass); answers it
        after the last chunk. Whether work is left."""
        try:
            if job.prompts.unread > self.turn_tokens:
                self.runtime.advance(job.prompts, self.turn_tokens)
                return True
            # A shortlist's trie is not kept: another ticket will hardly shortlist the same labels.
            job.scores.append(self.runtime.score(job.prompts, job.chunks.popleft(), keep=job.shortlists is None))
            if job.chunks:
                return True
            answers = _answers(job, torch.cat(job.scores, dim=1), self.vote_weight)
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


def _within(candidates: Sequence[str], shortlists: Sequence[tuple[str, ...] | None]) -> list[list[str]] | None:
    """Each request's shortlist cut to the candidates of the version that runs it (the live version
    may have moved on since the shortlist was made); None when one of them has nothing left, or
    had no shortlist: then every request of the group is scored against every candidate.

    >>> _within(["a", "b", "c"], [("a", "x"), ("c",)]), _within(["a", "b"], [("a",), None])
    ([['a'], ['c']], None)
    """
    known = set(candidates)
    cut = [[label for label in own if label in known] for own in shortlists if own]
    return cut if len(cut) == len(shortlists) and all(cut) else None


def _answers(job: _Job, scores: torch.Tensor, vote_weight: float) -> list[Classification]:
    """Each request's answer, ranked among its shortlist's columns of `scores`, or among all, with
    its votes weighed in."""
    column = {label: i for i, label in enumerate(job.scored)}
    answers = []
    for row, request in enumerate(job.requests):
        own = job.shortlists[row] if job.shortlists is not None else job.scored
        shares = torch.tensor([[request.votes.get(label, 0.0) for label in own]])
        voted = with_votes(scores[row: row + 1, [column[label] for label in own]], shares, vote_weight)
        answer = rank(job.run.version, own, voted, [request.top_k])[0]
        answers.append(replace(answer, shortlist=tuple(own)) if job.shortlists is not None else answer)
    return answers
