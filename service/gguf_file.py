"""Llama GGUF files for llama.cpp and ollama, written with gguf-py from Hugging Face tensors.

Two kinds of file:
- a model (`write_model`): every weight of a llama-architecture model (an adapter already merged
  in), named by gguf-py's own table for `MODEL_ARCH.LLAMA`;
- a LoRA adapter (`write_lora`): each adapted weight's A and B (`blk.N.attn_q.weight.lora_a`, ...)
  and `adapter.lora.alpha`, for `llama-cli --lora` on the base model's own GGUF.

Metadata. With the base model's GGUF (`base_gguf`), a model file copies every key of it
(hyperparameters, tokenizer, chat template, names, licence) once it has checked that the file
describes the model written: its dimensions, and every tensor's name and shape. Only the file
type (and `general.name`) change. Without one, the keys are written from the Hugging Face config
and `tokenizer.json`: byte-level BPE tokenizers (GPT-2 style, as SmolLM2's) only.

Layout. Hugging Face's llama rotates the two halves of each attention head, llama.cpp rotates
adjacent pairs, so the rows of `attn_q` and `attn_k` are reordered within each head
(`rope_permute`, as llama.cpp's converter does). In an adapter only B is reordered: the rows of
B·A are those of B.

Types. Vectors (norms) stay f32, as llama.cpp's converter keeps them. A matrix whose rows do not
divide into the type's blocks (32 values) is stored f16. In a q4_0 model the token embedding,
which a tied model also uses as its output layer, is stored q8_0, as the packaged SmolLM2 Q4_1
file stores it. Memory: one tensor at a time is converted and quantized while the file is written.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, Keys
from gguf.constants import GGML_QUANT_SIZES
from transformers import PretrainedConfig

from service.export_config import Quant
from service.registry import Signature, file_signature

LOG = logging.getLogger(__name__)

ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA]  # "llama"
_TYPES = {"f16": GGMLQuantizationType.F16, "q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0}
_FILE_TYPES = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
               "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
# Keys this module writes itself rather than copy from the base model's GGUF.
_OWN_KEYS = {Keys.General.ARCHITECTURE, Keys.General.NAME, Keys.General.FILE_TYPE, Keys.General.QUANTIZATION_VERSION}
# Hyperparameters that decide the tensors' shapes: a base GGUF must agree on all of them.
_SHAPE_KEYS = (Keys.LLM.VOCAB_SIZE, Keys.LLM.EMBEDDING_LENGTH, Keys.LLM.BLOCK_COUNT, Keys.LLM.FEED_FORWARD_LENGTH,
               Keys.Attention.HEAD_COUNT, Keys.Attention.HEAD_COUNT_KV, Keys.Rope.DIMENSION_COUNT)


class ExportError(Exception):
    """A model or adapter that cannot be written as asked; the message says why."""


@dataclass(frozen=True)
class _Tensor:
    name: str  # llama.cpp's
    data: torch.Tensor  # in llama.cpp's layout (q and k rows reordered), any float type
    qtype: GGMLQuantizationType

    @property
    def nbytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.data.shape[:-1]) * (self.data.shape[-1] // block) * size


def rope_permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """The rows of a q or k projection (or of its LoRA B) reordered within each of `heads` heads
    from Hugging Face's rotary layout (first half paired with second half) to llama.cpp's
    (adjacent pairs): row h·d + 2i + j of the result is row h·d + j·d/2 + i of `weight`."""
    rows = weight.shape[0]
    halves = weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
    return halves.transpose(1, 2).reshape(weight.shape)


def _qtype(kind: gguf.MODEL_TENSOR, shape: torch.Size, quant: Quant) -> GGMLQuantizationType:
    if len(shape) == 1:
        return GGMLQuantizationType.F32
    wanted = _TYPES[quant]
    if quant == "q4_0" and kind in (gguf.MODEL_TENSOR.TOKEN_EMBD, gguf.MODEL_TENSOR.OUTPUT):
        wanted = GGMLQuantizationType.Q8_0
    block, _ = GGML_QUANT_SIZES[wanted]
    return wanted if shape[-1] % block == 0 else GGMLQuantizationType.F16


def hparams(config: PretrainedConfig) -> dict[str, int | float]:
    """The llama.* keys of a Hugging Face llama config (those of llama.cpp's converter)."""
    if config.model_type != ARCH:
        raise ExportError(f"only llama-architecture base models are exported as GGUF; this one is "
                          f"{config.model_type!r}")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        raise ExportError(f"rope scaling {rope['rope_type']!r} is not exported; only plain rotary embeddings")
    keys: dict[str, int | float] = {
        Keys.LLM.VOCAB_SIZE: config.vocab_size,
        Keys.LLM.CONTEXT_LENGTH: config.max_position_embeddings,
        Keys.LLM.EMBEDDING_LENGTH: config.hidden_size,
        Keys.LLM.BLOCK_COUNT: config.num_hidden_layers,
        Keys.LLM.FEED_FORWARD_LENGTH: config.intermediate_size,
        Keys.Attention.HEAD_COUNT: heads,
        Keys.Attention.HEAD_COUNT_KV: config.num_key_value_heads or heads,
        Keys.Rope.DIMENSION_COUNT: head_dim,
        Keys.Rope.FREQ_BASE: float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))),
        Keys.Attention.LAYERNORM_RMS_EPS: float(config.rms_norm_eps),
    }
    if head_dim * heads != config.hidden_size:
        keys[Keys.Attention.KEY_LENGTH] = keys[Keys.Attention.VALUE_LENGTH] = head_dim
    return {key.format(arch=ARCH): value for key, value in keys.items()}


def _name_map(config: PretrainedConfig) -> gguf.TensorNameMap:
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)


def _llama_name(names: gguf.TensorNameMap, hf_name: str) -> tuple[gguf.MODEL_TENSOR, str]:
    found = names.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
    if found is None:
        raise ExportError(f"{hf_name} has no llama.cpp tensor name")
    return found


def _reordered(kind: gguf.MODEL_TENSOR, rows: torch.Tensor, config: PretrainedConfig) -> torch.Tensor:
    """`rows` (a q/k weight, bias or LoRA B) in llama.cpp's rotary layout; other tensors unchanged."""
    if kind == gguf.MODEL_TENSOR.ATTN_Q:
        return rope_permute(rows, config.num_attention_heads)
    if kind == gguf.MODEL_TENSOR.ATTN_K:
        return rope_permute(rows, config.num_key_value_heads or config.num_attention_heads)
    return rows


def model_tensors(config: PretrainedConfig, weights: Mapping[str, torch.Tensor], quant: Quant) -> list[_Tensor]:
    """A model's weights (Hugging Face names, tied ones once) as the tensors of its GGUF file."""
    names = _name_map(config)
    tensors = []
    for hf_name, weight in weights.items():
        kind, name = _llama_name(names, hf_name)
        tensors.append(_Tensor(name, _reordered(kind, weight.detach(), config), _qtype(kind, weight.shape, quant)))
    return tensors


def lora_tensors(config: PretrainedConfig, pairs: Mapping[str, Mapping[str, torch.Tensor]],
                 quant: Quant) -> list[_Tensor]:
    """A LoRA adapter's {module: {"A", "B"}} as the `.lora_a`/`.lora_b` tensors of its GGUF file."""
    names = _name_map(config)
    tensors = []
    for module, pair in pairs.items():
        kind, name = _llama_name(names, f"{module}.weight")
        a, b = pair["A"].detach(), _reordered(kind, pair["B"].detach(), config)
        tensors += [_Tensor(f"{name}.lora_a", a, _qtype(kind, a.shape, quant)),
                    _Tensor(f"{name}.lora_b", b, _qtype(kind, b.shape, quant))]
    return tensors


def _add(writer: GGUFWriter, key: str, value: int | float) -> None:
    if isinstance(value, float):
        writer.add_float32(key, value)
    else:
        writer.add_uint32(key, value)


def _pre_tokenizer(spec: dict[str, object]) -> str:
    """llama.cpp's name of the pre-tokenizer: `gpt-2` for GPT-2's own byte-level split, else
    `default` (llama.cpp's converter tells others apart by hashing sample encodings)."""
    pre = spec.get("pre_tokenizer")
    if isinstance(pre, dict) and pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    LOG.warning("pre-tokenizer %s has no llama.cpp name known here: written as `default`; set `model.gguf` to the "
                "base model's GGUF to copy its own", pre)
    return "default"


def add_hf_tokenizer(writer: GGUFWriter, model_dir: Path, vocab_size: int) -> None:
    """The tokenizer.* keys from a Hugging Face `tokenizer.json` (byte-level BPE only): every id's
    token, its type (special added tokens are control tokens), merges, special ids, chat template."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise ExportError(f"{model_dir} has no tokenizer.json: set `model.gguf` to the base model's GGUF")
    spec = json.loads(path.read_text(encoding="utf-8"))
    model, decoder = spec["model"], spec.get("decoder") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder.get("type") != "ByteLevel":
        raise ExportError("only byte-level BPE tokenizers (GPT-2 style) are written from tokenizer.json; "
                          "set `model.gguf` to the base model's GGUF to copy its tokenizer")
    by_id = {i: token for token, i in model["vocab"].items()}
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    by_id.update({i: t["content"] for i, t in added.items()})
    if max(by_id) >= vocab_size:
        raise ExportError(f"the tokenizer has ids up to {max(by_id)}, beyond the model's {vocab_size} embeddings")
    tokens, types = [], []
    for i in range(vocab_size):  # embeddings past the tokenizer's ids are padding, as the converter writes them
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        types.append(gguf.TokenType.UNUSED if i not in by_id
                     else gguf.TokenType.NORMAL if i not in added
                     else gguf.TokenType.CONTROL if added[i]["special"] else gguf.TokenType.USER_DEFINED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(spec))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)


@dataclass(frozen=True)
class BaseFile:
    """What a model export needs of the base model's GGUF, read once (parsing its tokenizer's
    ~100,000 strings takes gguf-py about a second)."""

    path: Path
    fields: tuple[tuple[str, object, GGUFValueType, GGUFValueType | None], ...]  # key, value, type, item type
    shapes: dict[str, tuple[int, ...]]  # tensor name → shape in torch's order

    def value(self, key: str) -> object:
        return next((value for name, value, _, _ in self.fields if name == key), None)


@functools.lru_cache(maxsize=4)
def _read_base(path: Path, signature: Signature | None) -> BaseFile:
    del signature  # part of the cache key only: a file rewritten in place is read again
    reader = GGUFReader(path)
    fields = tuple((f.name, f.contents(), f.types[0], f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None)
                   for f in reader.fields.values() if not f.name.startswith("GGUF."))  # not the header's
    shapes = {t.name: tuple(int(n) for n in reversed(t.shape.tolist())) for t in reader.tensors}  # GGUF: fastest first
    return BaseFile(path, fields, shapes)


def read_base(path: Path) -> BaseFile:
    """The base model's GGUF as exports use it, cached while the file is unchanged."""
    return _read_base(path, file_signature(path))


def copy_base_metadata(writer: GGUFWriter, base: BaseFile, keys: Mapping[str, int | float],
                       tensors: list[_Tensor]) -> None:
    """Every key of the base model's GGUF but those this module writes, after checking that it
    describes the model: its architecture, dimensions, and each tensor's name and shape."""
    if base.value(Keys.General.ARCHITECTURE) != ARCH:
        raise ExportError(f"`model.gguf` {base.path.name} is not a llama model")
    for key in (k.format(arch=ARCH) for k in _SHAPE_KEYS):
        theirs = base.value(key)
        if theirs is not None and theirs != keys[key]:
            raise ExportError(f"`model.gguf` {base.path.name} does not describe the base model: its {key} is "
                              f"{theirs}, the model's {keys[key]}")
    ours = {t.name: tuple(t.data.shape) for t in tensors}
    if base.shapes != ours:
        differ = sorted(name for name in base.shapes.keys() | ours.keys() if base.shapes.get(name) != ours.get(name))
        raise ExportError(f"`model.gguf` {base.path.name} does not describe the base model: {len(differ)} tensors "
                          f"differ, first {differ[0]} ({base.shapes.get(differ[0])} there, {ours.get(differ[0])} "
                          "here)")
    for key, value, kind, item_kind in base.fields:
        if key not in _OWN_KEYS:
            writer.add_key_value(key, value, kind, sub_type=item_kind)


def _file_type(writer: GGUFWriter, quant: Quant) -> None:
    writer.add_file_type(_FILE_TYPES[quant])
    if quant != "f16":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def write_model(path: Path, config: PretrainedConfig, weights: Mapping[str, torch.Tensor], quant: Quant,
                model_dir: Path, base_gguf: Path | None, name: str) -> None:
    """A whole model's GGUF file at `path`; metadata from `base_gguf` when given, else from the
    config and the tokenizer in `model_dir`."""
    keys = hparams(config)
    tensors = model_tensors(config, weights, quant)

    def metadata(writer: GGUFWriter) -> None:
        writer.add_name(name)
        _file_type(writer, quant)
        if base_gguf is not None:
            copy_base_metadata(writer, read_base(base_gguf), keys, tensors)
            return
        writer.add_type(gguf.GGUFType.MODEL)
        for key, value in keys.items():
            _add(writer, key, value)
        add_hf_tokenizer(writer, model_dir, config.vocab_size)

    _write(path, tensors, metadata)


def write_lora(path: Path, config: PretrainedConfig, pairs: Mapping[str, Mapping[str, torch.Tensor]],
               scale: float, quant: Quant, name: str) -> None:
    """A LoRA adapter's GGUF file at `path`. llama.cpp scales B·A by alpha / rank, so the alpha
    written is `scale` × rank, whatever rule (alpha / r, rsLoRA's alpha / √r) gave `scale`."""
    if not pairs:
        raise ExportError("the adapter adapts no weight")
    ranks = {pair["A"].shape[0] for pair in pairs.values()}
    if len(ranks) != 1:
        raise ExportError(f"the adapter's modules have different ranks {sorted(ranks)}; llama.cpp takes one alpha")
    tensors = lora_tensors(config, pairs, quant)

    def metadata(writer: GGUFWriter) -> None:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_name(name)
        writer.add_string(Keys.Adapter.TYPE, "lora")
        writer.add_float32(Keys.Adapter.LORA_ALPHA, scale * ranks.pop())
        _file_type(writer, quant)

    _write(path, tensors, metadata)


def _write(path: Path, tensors: list[_Tensor], metadata: Callable[[GGUFWriter], None]) -> None:
    """Header, metadata and tensor infos first, then each tensor converted as it is written."""
    writer = GGUFWriter(path, ARCH)
    try:
        metadata(writer)
        for tensor in tensors:
            writer.add_tensor_info(tensor.name, tuple(tensor.data.shape), np.dtype(np.float32), tensor.nbytes,
                                   raw_dtype=tensor.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor in tensors:
            values = tensor.data.to("cpu", torch.float32).contiguous().numpy()
            writer.write_tensor_data(gguf.quants.quantize(values, tensor.qtype))
    finally:
        writer.close()
