"""The serving model: one base model, the live adapter on it, swapped blue/green.

A new version is read and checked off the request path; the swap itself (attach the checked
weights, switch, drop the old adapter) runs under the same lock as inference, so a request in
flight finishes on the version it started with and every answer names its version.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file

from learners.base_model import load_base
from learners.scoring import LabelScorer
from service.registry import ADAPTER_WEIGHTS, AdapterRegistry

LOG = logging.getLogger(__name__)


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


class ModelRuntime:
    """Answers classification requests with the live adapter; `swap` changes it atomically."""

    def __init__(self, base_path: Path, registry: AdapterRegistry, version: str) -> None:
        self.registry = registry
        base, self.tokenizer = load_base(base_path)
        self.model = PeftModel.from_pretrained(base, registry.path(version), adapter_name=version)
        self.model.eval()
        self.version = version
        self.labels = registry.info(version).labels
        self._scorers: dict[tuple[str, ...], LabelScorer] = {}
        self._lock = threading.Lock()

    def swap(self, version: str) -> None:
        """Serve `version` from the next request on."""
        if version == self.version:
            return
        path = self.registry.path(version)
        weights = load_file(str(path / ADAPTER_WEIGHTS))  # safetensors only: nothing unpickled
        bad = [name for name, tensor in weights.items() if not torch.isfinite(tensor).all()]
        if bad:
            raise UnsafeAdapter(f"version {version} has non-finite weights in {bad[0]}")
        labels = self.registry.info(version).labels
        with self._lock:
            old = self.version
            self.model.load_adapter(str(path), adapter_name=version)
            self.model.set_adapter(version)
            self.model.delete_adapter(old)
            self.model.eval()
            self.version, self.labels = version, labels
        LOG.info("now serving adapter %s (was %s)", version, old)

    def _scorer(self, labels: Sequence[str]) -> LabelScorer:
        key = tuple(labels)
        if key not in self._scorers:
            self._scorers = {key: LabelScorer(self.tokenizer, key)}  # keep only the latest set
        return self._scorers[key]

    def classify(self, text: str, labels: Sequence[str] | None = None, top_k: int = 3) -> Classification:
        with self._lock:
            candidates = list(labels) if labels else self.labels
            if not candidates:
                raise NoLabels(f"adapter {self.version} has learned no labels yet; pass `labels`")
            scores = self._scorer(candidates).score(self.model, text)
            version = self.version
        probabilities = torch.softmax(scores, dim=0)
        ranked = torch.argsort(probabilities, descending=True)[:top_k].tolist()
        top = [(candidates[i], float(probabilities[i])) for i in ranked]
        return Classification(label=top[0][0], confidence=top[0][1], top=top, adapter_version=version)
