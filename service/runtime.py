"""The serving model: one pristine base, a model per loaded adapter version, swapped blue/green.

A version is read from the registry, checked (finite safetensors weights) and built into its own
model (merged into a copy of the adapted base weights where the method allows, see
`service/merge.py`) entirely off the request path: `prepare` does that, and `swap` only moves
the live pointer. Each request resolves its version once, when it gets the inference lock, runs
whole on that version's model, and every answer names it. A replaced version stays cached for
rollback until evicted; its memory goes once the last request holding it has finished.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from learners.base_model import load_base
from learners.placement import CPU, Placement
from learners.prompts import label_ids, prompt_ids
from learners.scoring import LabelScorer, PromptPass
from service.heap import release_free_memory
from service.merge import UnsafeAdapter, build, read_adapter
from service.registry import AdapterRegistry
from service.turns import TurnLock

LOG = logging.getLogger(__name__)

LIVE = "live"  # the name a request uses for "whatever version is live when I start"
# Label tries kept built: the live label set, its chunks (see `service/batching.py`), and a few
# sets named by requests. Shortlists are not kept: nearly every ticket has its own, and built from
# known token ids one costs well under a millisecond.
SCORERS_KEPT = 32
# Labels whose token ids are kept, so that no label is tokenized twice (requests may name 512).
LABEL_IDS_KEPT = 8192

__all__ = ["LIVE", "Classification", "Loaded", "ModelRuntime", "NoLabels", "UnsafeAdapter", "rank"]


class NoLabels(Exception):
    """The version has learned no labels yet and the request named none."""


@dataclass(frozen=True)
class Classification:
    label: str
    confidence: float
    top: list[tuple[str, float]]
    adapter_version: str
    candidates: int  # how many labels were scored
    shortlist: tuple[str, ...] | None = None  # the labels scored, when a shortlist of the candidates


@dataclass(frozen=True)
class Loaded:
    """A version ready to answer: its own model, and the labels it has learned."""

    version: str
    model: nn.Module
    labels: list[str]
    merged: bool


class ModelRuntime:
    """Serves the live version (and, on request, other registry versions by name).

    Parameters
    ----------
    max_cached
        Versions other than the live one kept loaded, for requests that name them, for instant
        rollback, and prepared ahead of their promotion; the least recently used goes beyond that.
    """

    def __init__(self, base_path: Path, registry: AdapterRegistry, version: str, max_cached: int = 0,
                 placement: Placement = CPU) -> None:
        self.registry = registry
        self.max_cached = max_cached
        self.placement = placement
        self.base, self.tokenizer = load_base(base_path, placement)  # pristine: never served, never written
        self.last_swap_seconds: float | None = None
        self._cached: OrderedDict[str, Loaded] = OrderedDict()  # non-live loaded versions
        self._scorers: OrderedDict[tuple[str, ...], LabelScorer] = OrderedDict()  # label set → its trie
        self._label_ids: OrderedDict[str, list[int]] = OrderedDict()  # label → its tokens, recent last
        self._ids_lock = threading.Lock()
        self._state = threading.Lock()  # the live pointer and the cache; held for microseconds
        self._building = threading.Lock()  # one version built at a time: each holds ~430 MB
        # One request computes at a time (on a few cores two would only slow each other down),
        # and long ones step aside between their steps (`step_aside`).
        self._lock = TurnLock()
        self._live = self._build(version)

    @property
    def version(self) -> str:
        return self._live.version

    @property
    def device(self) -> torch.device:
        """Where the served models run (requests' tensors go there)."""
        return self.placement.torch_device

    @property
    def labels(self) -> list[str]:
        return self._live.labels

    @property
    def model(self) -> nn.Module:
        """The live version's model."""
        return self._live.model

    # -- loading ----------------------------------------------------------------------------
    def _build(self, version: str) -> Loaded:
        """Read, check and build a registry version; raises RegistryError or UnsafeAdapter."""
        started = time.perf_counter()
        # Registry names only, never a caller's path.
        config, weights = read_adapter(self.registry.path(version), version)
        built = build(self.base, version, config, weights)
        LOG.info("loaded adapter %s (%s) in %.3f s", version, "merged" if built.merged else "unmerged",
                 time.perf_counter() - started)
        return Loaded(version, built.model, self.registry.info(version).labels, built.merged)

    def _lookup(self, version: str) -> Loaded | None:
        with self._state:
            if version == self._live.version:
                return self._live
            loaded = self._cached.get(version)
            if loaded is not None:
                self._cached.move_to_end(version)
            return loaded

    def _trim_cache(self) -> None:
        while len(self._cached) > self.max_cached:
            name, _ = self._cached.popitem(last=False)
            LOG.info("released adapter %s", name)

    def prepare(self, version: str) -> Loaded:
        """Load `version` into the cache without serving it (nothing waits on this but the caller)."""
        loaded = self._lookup(version)
        if loaded is not None:
            return loaded
        with self._building:
            loaded = self._lookup(version)  # another caller may have built it meanwhile
            if loaded is None:
                loaded = self._build(version)
                if self.max_cached:  # else it is only built: served by `swap`, or checked
                    with self._state:
                        self._cached[version] = loaded
                        self._trim_cache()
        return loaded

    def swap(self, version: str) -> None:
        """Serve `version` from the next request on (requests in flight keep theirs).

        Loads it first unless `prepare` already has; the switch itself is one pointer move.
        """
        started = time.perf_counter()
        loaded = self.prepare(version)
        with self._state:
            old = self._live
            if old.version == version:
                return
            self._cached.pop(version, None)
            self._live = loaded
            self._cached[old.version] = old  # an instant rollback, while `max_cached` leaves room
            self._trim_cache()
        release_free_memory()  # what the build left free, and an evicted version if nothing holds it
        self.last_swap_seconds = time.perf_counter() - started
        LOG.info("now serving adapter %s (was %s; swap %.3f s)", version, old.version, self.last_swap_seconds)

    # -- serving ----------------------------------------------------------------------------
    @contextmanager
    def pinned(self, version: str = LIVE) -> Iterator[Loaded]:
        """Hold the inference lock with `version` (default: the live one) for one request.

        A named version not loaded yet is loaded before the lock is taken.
        """
        named = None if version == LIVE else self.prepare(version)
        with self._lock:
            if named is None:
                with self._state:
                    run = self._live
            else:
                run = named
            yield run

    def step_aside(self, after_s: float = 0.0) -> bool:
        """From inside `pinned`, once the turn has lasted `after_s`: let the requests waiting for
        the model now go first, then resume (a long generation calls this between its steps).
        Returns whether any did."""
        return self._lock.step_aside(after_s)

    @property
    def steps_aside(self) -> int:
        """Times a long request let waiting ones use the model first."""
        return self._lock.steps_aside

    def attached(self) -> list[str]:
        """Versions currently loaded, the live one first."""
        with self._state:
            return [self._live.version, *self._cached]

    def _ids(self, labels: Sequence[str]) -> list[list[int]]:
        """Each label's token ids, tokenized once while it stays among the recently used."""
        with self._ids_lock:
            known = {label: self._label_ids[label] for label in labels if label in self._label_ids}
        fresh = {label: label_ids(self.tokenizer, label) for label in labels if label not in known}
        with self._ids_lock:  # request threads (the 413 check) and the batcher share the memo
            for label, ids in (known | fresh).items():
                self._label_ids.pop(label, None)
                self._label_ids[label] = ids  # most recent last
            while len(self._label_ids) > LABEL_IDS_KEPT:
                self._label_ids.popitem(last=False)
        return [known.get(label) or fresh[label] for label in labels]

    def _scorer(self, labels: Sequence[str], keep: bool = True) -> LabelScorer:
        key = tuple(labels)
        scorer = self._scorers.get(key) or LabelScorer(self.tokenizer, key, ids=self._ids(key))
        if keep:
            self._scorers.pop(key, None)
            self._scorers[key] = scorer  # most recent last
            while len(self._scorers) > SCORERS_KEPT:
                self._scorers.popitem(last=False)
        return scorer

    def label_tokens(self, labels: Sequence[str]) -> list[int]:
        """Tokens each label adds to a scoring pass."""
        return [len(ids) for ids in self._ids(labels)]

    def classify_work(self, text: str, labels: Sequence[str]) -> int:
        """Tokens one scoring pass of `text` against `labels` computes: the prompt (truncated as
        it is scored) plus every label's tokens (an upper bound: shared prefixes run once)."""
        prompt = prompt_ids(self.tokenizer, text, LabelScorer.MAX_PROMPT_TOKENS)
        return len(prompt) + sum(self.label_tokens(labels))

    def resolve(self, labels: Sequence[str] | None, version: str = LIVE) -> tuple[Loaded, list[str]]:
        """The version a classify request runs on, fixed for all its passes (the model stays in
        memory until they are done), and its candidate labels; raises NoLabels."""
        if version == LIVE:
            with self._state:
                run = self._live
        else:
            run = self.prepare(version)
        candidates = list(labels) if labels else run.labels
        if not candidates:
            raise NoLabels(f"adapter {run.version} has learned no labels yet; pass `labels`")
        return run, candidates

    def read(self, run: Loaded, texts: Sequence[str]) -> PromptPass:
        """Tickets' prompts on `run`'s model, to be read (`advance`, for a long one) and scored (`score`)."""
        return PromptPass(run.model, self.tokenizer, texts)

    def advance(self, prompts: PromptPass, tokens: int) -> None:
        """Read about `tokens` more prompt tokens."""
        with self._lock:
            prompts.advance(tokens)

    def score(self, prompts: PromptPass, labels: Sequence[str], keep: bool = True) -> torch.Tensor:
        """Log-likelihood of each label after each prompt (texts × labels), in one pass that reads
        what is left of the prompts; the label set's trie stays built for the next request unless
        `keep` is false."""
        scorer = self._scorer(labels, keep)
        with self._lock:
            return scorer.score_after(prompts)


def rank(version: str, candidates: Sequence[str], scores: torch.Tensor, top_ks: Sequence[int]
         ) -> list[Classification]:
    """Answers from label log-likelihoods (texts × candidates): softmax, then the top labels."""
    answers = []
    for row, top_k in zip(torch.softmax(scores, dim=1), top_ks, strict=True):
        ranked = torch.argsort(row, descending=True)[:top_k].tolist()
        top = [(candidates[i], float(row[i])) for i in ranked]
        answers.append(Classification(label=top[0][0], confidence=top[0][1], top=top, adapter_version=version,
                                      candidates=len(candidates)))
    return answers
