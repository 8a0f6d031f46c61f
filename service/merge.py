"""The model one adapter version is served with, built off the request path.

Each version gets its own model object. Its parameters share storage with one pristine copy of
the base weights, except those the adapter changes:
- plain LoRA (what `learners/` trains by default): each adapted weight becomes W + scale·B·A,
  computed straight from the checked safetensors with no PEFT wrapper built, so the version runs
  at the base model's speed (unmerged LoRA layers cost 1.76× per scoring pass on SmolLM2-135M);
- other methods PEFT can merge (IA3, DoRA, LoRA with rank or alpha patterns): PEFT wraps a full
  copy of the base and merges it with `safe_merge=True`, which refuses non-finite results;
- methods that cannot merge (prompt learning, e.g. prefix tuning): the PEFT model, unmerged.
Memory: a merged version holds its own copy of every adapted weight (about 430 MB for SmolLM2-135M
with LoRA on all linear layers); embeddings and norms stay shared.
"""

from __future__ import annotations

import copy
import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn

from service.registry import ADAPTER_WEIGHTS

_LORA_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")


class UnsafeAdapter(Exception):
    """Adapter weights that must not be served (not finite, or not fitting the base model)."""


@dataclass(frozen=True)
class Built:
    model: nn.Module
    merged: bool  # False only for methods that cannot merge


def share(base: nn.Module, replace: Mapping[str, torch.Tensor]) -> nn.Module:
    """A copy of `base` with its own modules and Parameter objects on the same storage, except the
    parameters named in `replace`. Copying costs no weight memory, and tied weights stay tied."""
    memo: dict[int, object] = {id(p): nn.Parameter(replace.get(name, p.data), requires_grad=False)
                               for name, p in base.named_parameters()}
    return copy.deepcopy(base, memo)


def plain_lora(config: PeftConfig) -> bool:
    """LoRA whose merge is exactly W + (alpha / r)·B·A on linear weights (rsLoRA: alpha / √r)."""
    return (isinstance(config, LoraConfig) and not config.use_dora and not config.rank_pattern
            and not config.alpha_pattern and not config.fan_in_fan_out and config.bias == "none"
            and not config.modules_to_save and not getattr(config, "lora_bias", False)
            and not config.layer_replication)


def lora_scale(config: LoraConfig) -> float:
    """What B·A is multiplied by in the merged weight (rsLoRA: alpha / √r)."""
    return float(config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r))


def lora_pairs(weights: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]] | None:
    """A LoRA state dict as {adapted module: {"A": A, "B": B}}; None when a key is not a plain
    LoRA weight (embedding LoRA, DoRA magnitudes, saved modules) or a module lacks A or B."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        match = _LORA_KEY.fullmatch(key)
        if match is None:
            return None
        pairs.setdefault(match.group(1), {})[match.group(2)] = tensor
    return pairs if all(set(pair) == {"A", "B"} for pair in pairs.values()) else None


def read_adapter(path: Path, name: str) -> tuple[PeftConfig, dict[str, torch.Tensor]]:
    """A version directory's PEFT config and weights: safetensors only (nothing unpickled), every
    weight finite (UnsafeAdapter otherwise)."""
    weights = load_file(str(path / ADAPTER_WEIGHTS))
    bad = [key for key, tensor in weights.items() if not torch.isfinite(tensor).all()]
    if bad:
        raise UnsafeAdapter(f"version {name} has non-finite weights in {bad[0]}")
    config = PeftConfig.from_pretrained(str(path))
    config.inference_mode = True
    return config, weights


def lora_merged_weights(base: nn.Module, config: PeftConfig,
                        weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The adapted weights of a plain LoRA version, merged; None when the direct merge does not
    apply (another method, or a layout this function does not know), so PEFT must do it."""
    if not plain_lora(config):
        return None
    assert isinstance(config, LoraConfig)
    pairs = lora_pairs(weights)
    if pairs is None:
        return None
    params = dict(base.named_parameters())
    # A weight reached under two names is tied (embeddings and lm_head): merging into it would
    # change both, where PEFT changes only the adapted module.
    uses = Counter(id(p) for _, p in base.named_parameters(remove_duplicate=False))
    groups: dict[torch.Size, list[str]] = {}  # weights of one shape merge in one batched product
    for module, pair in pairs.items():
        target = params.get(f"{module}.weight")
        if target is None or target.dim() != 2 or uses[id(target)] > 1:
            return None
        if pair["A"].shape != (config.r, target.shape[1]) or pair["B"].shape != (target.shape[0], config.r):
            raise UnsafeAdapter(f"the LoRA weights of {module} do not fit the base model")
        groups.setdefault(target.shape, []).append(module)
    scale = lora_scale(config)
    merged = {}
    # A handful of large operations rather than two per layer: on a CPU shared with other work
    # each operation's thread start-up, not its arithmetic, dominates (210 layers of SmolLM2).
    for modules in groups.values():
        weights_of = [params[f"{m}.weight"].data for m in modules]
        stacked = torch.stack(weights_of)  # the copy that becomes this version's weights
        b = torch.stack([pairs[m]["B"] for m in modules]).to(stacked.device, torch.float32)
        a = torch.stack([pairs[m]["A"] for m in modules]).to(stacked.device, torch.float32)
        # Summed in fp32 and rounded once to a bf16/fp16 base's precision (in place for fp32).
        stacked = stacked.float().baddbmm_(b, a, alpha=scale).to(stacked.dtype)
        if not torch.isfinite(stacked).all():  # what PEFT's merge(safe_merge=True) refuses
            raise UnsafeAdapter(f"merging the adapter gives non-finite weights in one of {', '.join(modules)}")
        merged.update({f"{m}.weight": w for m, w in zip(modules, stacked.unbind(), strict=True)})
    return merged


def build(base: nn.Module, name: str, config: PeftConfig, weights: Mapping[str, torch.Tensor]) -> Built:
    """The model serving one version, on the base's device; `base` is never modified."""
    device = next(base.parameters()).device
    weights = {key: tensor.to(device) for key, tensor in weights.items()}
    merged = lora_merged_weights(base, config, weights)
    if merged is not None:
        return Built(share(base, merged).eval(), merged=True)
    mergeable = not config.is_prompt_learning
    # A merge writes the adapted weights, so it gets a full copy; an unmerged model only reads.
    model = get_peft_model(copy.deepcopy(base) if mergeable else share(base, {}), config, adapter_name=name)
    try:
        set_peft_model_state_dict(model, dict(weights), adapter_name=name)
    except (KeyError, RuntimeError, ValueError) as exc:  # PEFT's own refusals (shapes, names)
        raise UnsafeAdapter(f"version {name} does not fit the base model: {exc}") from exc
    # Read back rather than trust `load_state_dict`'s key lists: prefix tuning loads its prompt
    # encoder outside them, so they report its tensors as missing and unexpected.
    loaded = get_peft_model_state_dict(model, adapter_name=name)
    if loaded.keys() != weights.keys() or not all(torch.equal(loaded[k], weights[k]) for k in loaded):
        raise UnsafeAdapter(f"version {name} does not fit the base model "
                            f"({len(weights.keys() - loaded.keys())} tensors not loaded, "
                            f"{len(loaded.keys() - weights.keys())} missing)")
    if not mergeable:
        return Built(model.eval(), merged=False)
    try:
        plain = model.merge_and_unload(safe_merge=True)
    except ValueError as exc:  # PEFT's refusal of non-finite merged weights
        raise UnsafeAdapter(f"version {name}: {exc}") from exc
    return Built(plain.eval(), merged=True)
