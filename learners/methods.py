"""PEFT methods: the one place that maps `adapter.method` to a PEFT config.

Everything else (warm start, EWC, training, saving, serving) is method-agnostic: it goes
through `PeftModel` and the adapter's trainable parameters. Prefix tuning differs in one
respect: its virtual tokens live in the key/value cache, which label scoring accounts for.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from peft import (
    IA3Config,
    LoraConfig,
    PeftConfig,
    PeftModel,
    PrefixTuningConfig,
    get_peft_model,
    set_peft_model_state_dict,
)
from safetensors.torch import load_file
from transformers import PreTrainedModel

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



def warm_start(base: PreTrainedModel, adapter_dir: Path) -> PeftModel:
    """A trainable copy of a saved adapter, in the saved adapter's own method."""
    config = PeftConfig.from_pretrained(str(adapter_dir))
    if not config.is_prompt_learning:
        return PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
    # PEFT loads prompt-learning adapters for inference only; the same weights go into a new,
    # trainable model of the same config instead.
    config.inference_mode = False
    model = get_peft_model(base, config)
    set_peft_model_state_dict(model, load_file(str(adapter_dir / "adapter_model.safetensors")))
    return model  # type: ignore[return-value]
