"""learners: incremental PEFT-adapter updates with EWC and replay, and the forgetting gate.

The names below load on first use (PEP 562), so that reading the settings (`learners.config`,
part of the service's settings tree) does not import torch and transformers: a CLI command
starts in a fraction of a second instead of several.
"""

from __future__ import annotations

import importlib

_HOMES = {
    "learners.base_model": ("SMOLLM2", "TINY_LLAMA", "load_base", "resolve_base_model"),
    "learners.config": ("AdapterSettings", "EwcSettings", "GateSettings", "TrainSettings"),
    "learners.gate": ("evaluate", "judge"),
    "learners.methods": ("peft_config", "warm_start"),
    "learners.scoring": ("LabelScorer",),
    "learners.reports": ("Canary", "Check", "GateReport", "Progress", "RoundReport", "UpdateOutcome", "WindowScore"),
    "learners.train": ("Cancelled", "run_round"),
    "learners.update_step": ("initial_adapter", "train_adapter", "train_candidate"),
}
_MODULE_OF = {name: module for module, names in _HOMES.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> object:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'learners' has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULE_OF[name]), name)
