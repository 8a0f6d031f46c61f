"""The serving model: one base model, the live adapter on it, swapped blue/green.

Every adapter the runtime holds is attached to the one base model under its version name.
A new version is read from the registry and checked (finite safetensors weights) off the
request path; attaching it and moving the live pointer run under the inference lock. Each
request resolves its version once, at its start, and runs whole under that lock: a request in
flight finishes on the version it started with, and every answer names that version. The
previous live version is released (or kept as a cached named version) only once the lock is
free again, that is, once the requests using it have drained.
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
from peft import PeftConfig, PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file

from learners.base_model import load_base
from learners.scoring import LabelScorer
from service.registry import ADAPTER_WEIGHTS, AdapterRegistry

LOG = logging.getLogger(__name__)

LIVE = "live"  # the name a request uses for "whatever version is live when I start"


class NoLabels(Exception):
    """The version has learned no labels yet and the request named none."""


class UnsafeAdapter(Exception):
    """Adapter weights that must not be served (not finite)."""


@dataclass(frozen=True)
class Classification:
    label: str
    confidence: float
    top: list[tuple[str, float]]
    adapter_version: str


@dataclass(frozen=True)
class Checked:
    """A version read from the registry and checked, ready to attach (no model touched yet)."""

    name: str
    config: PeftConfig
    weights: dict[str, torch.Tensor]
    labels: list[str]


@dataclass(frozen=True)
class Pinned:
    """What a request runs on, fixed at its start: the model with `version` active."""

    model: PeftModel
    version: str
    labels: list[str]


class ModelRuntime:
    """Serves the live adapter (and, on request, other registry versions by name).

    Parameters
    ----------
    max_cached
        Versions other than the live one kept attached for requests that name them; the least
        recently used is released beyond that.
    """

    def __init__(self, base_path: Path, registry: AdapterRegistry, version: str, max_cached: int = 2) -> None:
        self.registry = registry
        self.max_cached = max_cached
        base, self.tokenizer = load_base(base_path)
        self.model = PeftModel.from_pretrained(base, registry.path(version), adapter_name=version)
        self.model.eval()
        self.version = version
        self.labels = registry.info(version).labels
        self.last_swap_seconds: float | None = None
        self._cached: OrderedDict[str, list[str]] = OrderedDict()  # non-live attached versions
        self._scorers: dict[tuple[str, ...], LabelScorer] = {}
        self._lock = threading.Lock()

    # -- loading ----------------------------------------------------------------------------
    def check(self, version: str) -> Checked:
        """Read and check a registry version; raises RegistryError or UnsafeAdapter."""
        path = self.registry.path(version)  # registry names only, never a caller's path
        weights = load_file(str(path / ADAPTER_WEIGHTS))  # safetensors only: nothing unpickled
        bad = [name for name, tensor in weights.items() if not torch.isfinite(tensor).all()]
        if bad:
            raise UnsafeAdapter(f"version {version} has non-finite weights in {bad[0]}")
        config = PeftConfig.from_pretrained(str(path))  # the version's own method (LoRA, IA3, prefix)
        if config.peft_type != self.model.active_peft_config.peft_type:
            # PEFT attaches adapters of one family to a model; a new method is a new deployment.
            raise UnsafeAdapter(f"version {version} is {config.peft_type.value}, the served model "
                                f"{self.model.active_peft_config.peft_type.value}")
        config.inference_mode = True
        return Checked(version, config, weights, self.registry.info(version).labels)

    def _attach(self, checked: Checked) -> None:
        """Add a checked version to the model (caller holds the lock)."""
        if checked.name in self.model.peft_config:
            return
        self.model.add_adapter(checked.name, checked.config, low_cpu_mem_usage=True)
        try:
            set_peft_model_state_dict(self.model, checked.weights, adapter_name=checked.name,
                                      low_cpu_mem_usage=True)
            # Read back rather than trust `load_state_dict`'s key lists: prefix tuning loads its
            # prompt encoder outside them, so they report its tensors as missing and unexpected.
            loaded = get_peft_model_state_dict(self.model, adapter_name=checked.name)
            fits = loaded.keys() == checked.weights.keys() and all(
                torch.equal(loaded[k], checked.weights[k]) for k in loaded)
        except (KeyError, RuntimeError, ValueError) as exc:  # PEFT's own refusals (shapes, names)
            fits, loaded = False, {}
            LOG.warning("version %s failed to load: %r", checked.name, exc)
        if not fits:
            self.model.delete_adapter(checked.name)
            raise UnsafeAdapter(f"version {checked.name} does not fit the base model "
                                f"({len(checked.weights.keys() - loaded.keys())} tensors not loaded, "
                                f"{len(loaded.keys() - checked.weights.keys())} missing)")
        self.model.eval()

    def _release(self, name: str) -> None:
        if name in self.model.peft_config and name != self.version:
            self.model.delete_adapter(name)
            LOG.info("released adapter %s", name)

    def _trim_cache(self) -> None:
        while len(self._cached) > self.max_cached:
            name, _ = self._cached.popitem(last=False)
            self._release(name)

    def swap(self, version: str) -> None:
        """Serve `version` from the next request on (requests in flight keep theirs)."""
        if version == self.version:
            return
        started = time.perf_counter()
        checked = self.check(version) if version not in self._cached else None
        with self._lock:
            if version in self._cached:
                labels = self._cached.pop(version)
            else:
                checked = checked or self.check(version)  # evicted since the look above: rare
                self._attach(checked)
                labels = checked.labels
            old, old_labels = self.version, self.labels
            self.version, self.labels = version, labels
            self.model.set_adapter(version)
            self._cached[old] = old_labels  # keeps rollback instant; released when evicted
            self._trim_cache()
        self.last_swap_seconds = time.perf_counter() - started
        LOG.info("now serving adapter %s (was %s; swap %.3f s)", version, old, self.last_swap_seconds)

    # -- serving ----------------------------------------------------------------------------
    @contextmanager
    def pinned(self, version: str = LIVE) -> Iterator[Pinned]:
        """Hold the model with `version` active (default: the live one) for one request.

        Named versions not yet attached are read and checked before the lock is taken.
        """
        wanted = None if version == LIVE else version
        checked = (self.check(wanted) if wanted and wanted != self.version and wanted not in self._cached
                   else None)
        with self._lock:
            if wanted is None or wanted == self.version:
                name, labels = self.version, self.labels
            else:
                if wanted not in self._cached:
                    # Rare: it was live at the check above and has since been swapped out and evicted.
                    ready = checked or self.check(wanted)
                    self._attach(ready)
                    self._cached[wanted] = ready.labels
                self._cached.move_to_end(wanted)
                name, labels = wanted, self._cached[wanted]
            if self.model.active_adapter != name:
                self.model.set_adapter(name)
            try:
                yield Pinned(self.model, name, labels)
            finally:
                if self.model.active_adapter != self.version:
                    self.model.set_adapter(self.version)
                self._trim_cache()

    def attached(self) -> list[str]:
        """Versions currently attached to the model, the live one first."""
        return [self.version, *self._cached]

    def _scorer(self, labels: Sequence[str]) -> LabelScorer:
        key = tuple(labels)
        if key not in self._scorers:
            self._scorers = {key: LabelScorer(self.tokenizer, key)}  # keep only the latest set
        return self._scorers[key]

    def classify(self, text: str, labels: Sequence[str] | None = None, top_k: int = 3,
                 version: str = LIVE) -> Classification:
        return self.classify_batch([text], labels, [top_k], version)[0]

    def classify_batch(self, texts: Sequence[str], labels: Sequence[str] | None, top_ks: Sequence[int],
                       version: str = LIVE) -> list[Classification]:
        """Classify several tickets against one label set in one batched pass, on one version."""
        with self.pinned(version) as run:
            candidates = list(labels) if labels else run.labels
            if not candidates:
                raise NoLabels(f"adapter {run.version} has learned no labels yet; pass `labels`")
            scorer = self._scorer(candidates)
            scores = scorer.score_batch(run.model, texts) if len(texts) > 1 else scorer.score(run.model, texts[0])[None]
        answers = []
        for row, top_k in zip(torch.softmax(scores, dim=1), top_ks, strict=True):
            ranked = torch.argsort(row, descending=True)[:top_k].tolist()
            top = [(candidates[i], float(row[i])) for i in ranked]
            answers.append(Classification(label=top[0][0], confidence=top[0][1], top=top,
                                          adapter_version=run.version))
        return answers
