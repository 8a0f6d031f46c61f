"""PEFT methods: the one place that maps `adapter.method` to a PEFT config.

Everything else (warm start, EWC, training, saving, serving) is method-agnostic: it goes
through `PeftModel` and the adapter's trainable parameters. Prefix tuning differs in one
respect: its virtual tokens live in the key/value cache, which label scoring accounts for.
"""

from __future__ import annotations

from collections.abc import Callable

from peft import IA3Config, LoraConfig, PeftConfig, PrefixTuningConfig

from learners.config import AdapterSettings

TASK = "CAUSAL_LM"


def _lora(cfg: AdapterSettings) -> PeftConfig:
    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=cfg.target_modules or "all-linear", task_type=TASK)


def _prefix(cfg: AdapterSettings) -> PeftConfig:
    return PrefixTuningConfig(num_virtual_tokens=cfg.virtual_tokens, task_type=TASK)


def _ia3(cfg: AdapterSettings) -> PeftConfig:
    return IA3Config(target_modules=cfg.target_modules, feedforward_modules=cfg.feedforward_modules,
                     task_type=TASK)


BUILDERS: dict[str, Callable[[AdapterSettings], PeftConfig]] = {
    "lora": _lora,
    "prefix": _prefix,
    "ia3": _ia3,
}


def peft_config(cfg: AdapterSettings) -> PeftConfig:
    """The PEFT config of a new adapter.

    >>> type(peft_config(AdapterSettings(method="ia3"))).__name__
    'IA3Config'
    """
    return BUILDERS[cfg.method](cfg)

