"""GGUF exports read back with gguf-py (no llama.cpp): every tensor present with its shape, the
weights within their quantization's error of the merged weights the server serves, the base
model's tokenizer; the adapter alone, applied to the base file as llama.cpp applies it; a
zero-delta SmolLM2 export against the packaged GGUF that llama.cpp's own converter wrote;
refusals that leave nothing behind; the cache; the command line."""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader
from transformers import AutoTokenizer, PreTrainedModel
from typer.testing import CliRunner

from learners.base_model import SMOLLM2, TINY_LLAMA, load_base, packaged_gguf, resolve_base_model
from learners.config import AdapterSettings
from service.cli import app
from service.export import Exporter, ExportError, UnsupportedExport, atomic_write
from service.merge import build, read_adapter
from service.registry import AdapterRegistry, RegistryError
from tests.conftest import MODEL_CACHE, add_version_of, add_versions

LABELS = ["card arrival", "exchange rate"]
# Hugging Face llama module → llama.cpp tensor, stated here independently of gguf-py's table.
LLAMA_TENSORS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
                 "post_attention_layernorm": "ffn_norm"}
F16_EPS = 2.0 ** -11  # f16's relative rounding error


def rotary_interleaved(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's rotary layout, from its definition: within each head the dimension pairs
    (i, i + d/2) that Hugging Face rotates together become adjacent rows (2i, 2i + 1)."""
    d = weight.shape[0] // heads
    return weight[[h * d + j * (d // 2) + i for h in range(heads) for i in range(d // 2) for j in range(2)]]


def expected_tensors(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """A llama's weights under llama.cpp's names and in its layout (tied output: token_embd only)."""
    config = model.config
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    expected = {"token_embd.weight": model.model.embed_tokens.weight, "output_norm.weight": model.model.norm.weight}
    for i, layer in enumerate(model.model.layers):
        for module, name in LLAMA_TENSORS.items():
            weight = layer.get_submodule(module).weight
            expected[f"blk.{i}.{name}.weight"] = rotary_interleaved(weight, heads[name]) if name in heads else weight
    return {name: tensor.detach() for name, tensor in expected.items()}


def read_tensors(reader: GGUFReader) -> dict[str, tuple[Q, np.ndarray]]:
    """Every tensor of a file, dequantized, in torch's dimension order."""
    return {t.name: (t.tensor_type, gguf.quants.dequantize(t.data, t.tensor_type).reshape(
        tuple(int(n) for n in reversed(t.shape.tolist())))) for t in reader.tensors}


def allowed_error(reference: np.ndarray, qtype: Q) -> np.ndarray:
    """The most each value may be off once stored as `qtype`. Per block of 32 values with largest
    magnitude m, q8_0 stores round(x / s)·s with s = m/127, q4_0 (x / s rounded, the top step
    clipped) with s = m/8; each scale is itself an f16."""
    if qtype == Q.F32:
        return np.zeros_like(reference)
    if qtype == Q.F16:
        return np.abs(reference) * F16_EPS + 6e-8  # 6e-8: f16's subnormal spacing
    steps = {Q.Q8_0: 127, Q.Q4_0: 8}[qtype]
    blocks = np.abs(reference.reshape(-1, 32)).max(axis=1, keepdims=True) / steps
    per_step = 0.5 if qtype == Q.Q8_0 else 1.0  # rounding; q4_0's clipped top step is off by a whole step
    return np.broadcast_to(blocks * (per_step + steps * F16_EPS), (len(blocks), 32)).reshape(reference.shape)


@dataclass
class Exported:
    registry: AdapterRegistry
    base: PreTrainedModel
    exporter: Exporter  # copies the metadata of `base_file`
    base_file: Path  # v0000 (B = 0: the base model), written from the Hugging Face config and tokenizer
    version: str  # random LoRA weights

    def merged(self) -> PreTrainedModel:
        """The version as the server serves it."""
        model: PreTrainedModel = build(self.base, self.version, *read_adapter(
            self.registry.path(self.version), self.version)).model
        return model


@pytest.fixture(scope="module")
def exported(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    registry = AdapterRegistry(tmp_path_factory.mktemp("export") / "registry")
    add_version_of(registry, tiny_llama, AdapterSettings(), LABELS)  # v0000
    registry.promote("v0000")
    [version] = add_versions(registry, 1, LABELS)
    base, _ = load_base(tiny_llama)
    base_file = Exporter(registry, lambda: base, tiny_llama, None).export("v0000", "f16").path
    return Exported(registry, base, Exporter(registry, lambda: base, tiny_llama, base_file), base_file, version)


@functools.cache
def read(path: Path) -> GGUFReader:
    return GGUFReader(path)  # ~1 s each: the tokenizer's 98,000 strings are parsed one by one


def test_a_file_written_from_the_hugging_face_config_holds_the_base_tokenizer(exported: Exported,
                                                                             tiny_llama: Path) -> None:
    reader = read(exported.base_file)
    field = lambda key: reader.get_field(key).contents()  # noqa: E731
    config = exported.base.config
    assert field("general.architecture") == "llama" and field("general.type") == "model"
    assert (field("llama.block_count"), field("llama.embedding_length"), field("llama.feed_forward_length"),
            field("llama.attention.head_count"), field("llama.attention.head_count_kv"), field("llama.vocab_size"),
            field("llama.rope.dimension_count")) == (2, 64, 128, 4, 2, config.vocab_size, 16)
    assert field("llama.rope.freq_base") == pytest.approx(10000.0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    assert field("tokenizer.ggml.model") == "gpt2"
    assert field("tokenizer.ggml.tokens") == tokenizer.convert_ids_to_tokens(list(range(config.vocab_size)))
    specials = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    assert field("tokenizer.ggml.token_type") == [gguf.TokenType.CONTROL if i in specials else gguf.TokenType.NORMAL
                                                  for i in range(config.vocab_size)]
    merges = json.loads((tiny_llama / "tokenizer.json").read_text())["model"]["merges"]
    assert field("tokenizer.ggml.merges") == [" ".join(pair) for pair in merges]
    assert (field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.eos_token_id"),
            field("tokenizer.ggml.padding_token_id"), field("tokenizer.ggml.unknown_token_id")) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id)
    assert "<|im_start|>" in field("tokenizer.chat_template")
    # v0000's B is zero: the file holds the base weights.
    stored = read_tensors(reader)
    for name, weight in expected_tensors(exported.base).items():
        qtype, values = stored[name]
        assert qtype == (Q.F32 if weight.dim() == 1 else Q.F16)
        assert np.abs(values - weight.numpy()).max() <= allowed_error(weight.numpy(), qtype).max(), name


@pytest.mark.parametrize("quant", ["f16", "q8_0", "q4_0"])
def test_a_merged_version_reads_back_within_its_quantization_error(exported: Exported, quant: str) -> None:
    made = exported.exporter.export(exported.version, quant)  # type: ignore[arg-type]
    assert made.sha256 == hashlib.sha256(made.path.read_bytes()).hexdigest()
    reader = read(made.path)
    expected = expected_tensors(exported.merged())
    stored = read_tensors(reader)
    assert {name: values.shape for name, (_, values) in stored.items()} == {
        name: tuple(weight.shape) for name, weight in expected.items()}
    matrix = {"f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[quant]
    for name, weight in expected.items():
        qtype, values = stored[name]
        # The embedding is also the (tied) output layer: a q4_0 file keeps it in q8_0.
        assert qtype == (Q.F32 if weight.dim() == 1 else Q.Q8_0 if quant == "q4_0" and name == "token_embd.weight"
                         else matrix), name
        reference = weight.numpy()
        excess = np.abs(values - reference) - allowed_error(reference, qtype)
        assert excess.max() <= 1e-7, f"{name}: {excess.max()} past {qtype.name}'s error"
    # The metadata is the base file's (the tokenizer included), named after the version.
    base = read(exported.base_file)
    fields = {f.name: f.contents() for f in reader.fields.values() if not f.name.startswith("GGUF.")}
    assert fields.pop("general.name") == f"evergreen {exported.version}"
    assert fields.pop("general.file_type") == {"f16": 1, "q8_0": 7, "q4_0": 2}[quant]
    assert fields.pop("general.quantization_version", None) == (None if quant == "f16" else 2)
    assert fields == {f.name: f.contents() for f in base.fields.values()
                      if not f.name.startswith("GGUF.") and f.name not in ("general.name", "general.file_type")}


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_the_adapter_alone_applied_to_the_base_file_gives_the_merged_file(exported: Exported, quant: str) -> None:
    adapter = GGUFReader(exported.exporter.export(exported.version, quant, adapter_only=True).path)
    field = lambda key: adapter.get_field(key).contents()  # noqa: E731
    assert (field("general.architecture"), field("general.type"), field("adapter.type")) == ("llama", "adapter", "lora")
    config = json.loads((exported.registry.path(exported.version) / "adapter_config.json").read_text())
    rank, alpha = config["r"], field("adapter.lora.alpha")
    assert alpha == config["lora_alpha"]  # llama.cpp scales by alpha / rank, as PEFT does
    lora = read_tensors(adapter)
    adapted = [name for name in expected_tensors(exported.base) if name.startswith("blk.") and "norm" not in name]
    assert set(lora) == {f"{name}.lora_{ab}" for name in adapted for ab in "ab"}
    base = read_tensors(read(exported.base_file))
    merged = read_tensors(read(exported.exporter.export(exported.version, "f16").path))
    rms = lambda x: float(np.sqrt(np.mean(np.square(x))))  # noqa: E731
    for name in adapted:
        (a_type, a), (b_type, b) = lora[f"{name}.lora_a"], lora[f"{name}.lora_b"]
        assert a.shape == (rank, base[name][1].shape[1]) and b.shape == (base[name][1].shape[0], rank)
        # Rows of 16 (the rank) do not fill a q8_0 block of 32: B stays f16.
        assert (a_type, b_type) == ((Q.F16, Q.F16) if quant == "f16" else (Q.Q8_0, Q.F16))
        applied = base[name][1] + alpha / rank * b @ a  # what llama.cpp computes with --lora
        # Off by the files' roundings only: B in the wrong row order would be off by the whole delta.
        delta, error = rms(merged[name][1] - base[name][1]), rms(applied - merged[name][1])
        assert error < delta * 0.02, f"{name}: off by {error}, the adapter moves {delta}"


def test_a_zero_delta_smollm2_export_equals_the_packaged_gguf(tmp_path: Path) -> None:
    """The packaged file was written by llama.cpp's converter: same names, same (permuted) q and
    k layout, and SmolLM2's weights are its Q4_1 values dequantized, so f16 holds them to rounding."""
    smollm2 = resolve_base_model(SMOLLM2, MODEL_CACHE)
    registry = AdapterRegistry(tmp_path / "registry")
    add_version_of(registry, smollm2, AdapterSettings(rank=4), [])
    base, _ = load_base(smollm2)
    packaged = packaged_gguf(SMOLLM2)
    assert packaged is not None
    ours = GGUFReader(Exporter(registry, lambda: base, smollm2, packaged).export("v0000", "f16").path)
    theirs = GGUFReader(packaged)
    assert ours.get_field("tokenizer.ggml.pre").contents() == "smollm"  # copied, not guessed
    stored = read_tensors(ours)
    assert len(stored) == len(theirs.tensors) == 272
    for name, (_, original) in read_tensors(theirs).items():
        qtype, values = stored[name]
        assert qtype == (Q.F32 if original.ndim == 1 else Q.F16), name
        assert values.shape == original.shape, name
        assert np.abs(values - original).max() <= allowed_error(original, Q.F16).max(), name


def test_refusals_say_why_and_leave_nothing_behind(exported: Exported, tiny_llama: Path) -> None:
    registry, exporter = exported.registry, exported.exporter
    prefix = add_version_of(registry, tiny_llama, AdapterSettings(method="prefix", virtual_tokens=4), LABELS)
    for adapter_only in (False, True):
        with pytest.raises(ExportError, match="prefix_tuning, prompt learning: its virtual tokens cannot be merged"):
            exporter.export(prefix, "q8_0" if not adapter_only else "f16", adapter_only)
    ia3 = add_version_of(registry, tiny_llama, AdapterSettings(method="ia3"), LABELS)
    with pytest.raises(ExportError, match="ia3, not plain LoRA: an adapter-only GGUF needs LoRA's A and B"):
        exporter.export(ia3, "f16", adapter_only=True)
    with pytest.raises(UnsupportedExport, match="f16 or q8_0, not q4_0"):
        exporter.export(exported.version, "q4_0", adapter_only=True)
    with pytest.raises(RegistryError, match="unknown adapter version 'v0999'"):
        exporter.export("v0999", "f16")
    # A base GGUF of another model is refused before anything is written.
    packaged = packaged_gguf(SMOLLM2)
    assert packaged is not None
    wrong = Exporter(registry, lambda: exported.base, tiny_llama, packaged)
    with pytest.raises(ExportError, match="does not describe the base model: its llama.embedding_length is 576, "
                                          "the model's 64"):
        wrong.export(ia3, "q8_0")
    assert not list(registry.exports(ia3).iterdir())
    # An IA3 version merges (as it is served) and exports.
    assert exporter.export(ia3, "q8_0").size > 0


def test_an_export_is_made_once_and_remade_when_its_sha256_is_missing(exported: Exported) -> None:
    first = exported.exporter.export("live", "q8_0")  # `live` is v0000
    assert first.version == "v0000" and first.filename == "evergreen-v0000-q8_0.gguf"
    again = exported.exporter.export("v0000", "q8_0")
    assert again == first and again.path.stat().st_ino == first.path.stat().st_ino  # not rewritten
    # A crash between the file's rename and its sha256 leaves a file that is not trusted.
    kept = first.path.with_name("kept.gguf")
    kept.hardlink_to(first.path)  # holds the first file's inode, so a new file cannot reuse its number
    first.path.with_name(first.path.name + ".sha256").unlink()
    remade = exported.exporter.export("v0000", "q8_0")
    assert remade.sha256 == first.sha256 and remade.path.stat().st_ino != kept.stat().st_ino
    kept.unlink()


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "model.gguf"
    target.write_bytes(b"complete")

    def half_then_fail(path: Path) -> None:
        path.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_then_fail)
    assert target.read_bytes() == b"complete" and [p.name for p in tmp_path.iterdir()] == ["model.gguf"]


def test_the_command_exports_a_version_and_refuses_bad_input(exported: Exported, tiny_llama: Path,
                                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVERGREEN_DATA_DIR", str(exported.registry.root.parent))  # the registry is data_dir's
    monkeypatch.setenv("EVERGREEN_MODEL_BASE", TINY_LLAMA)
    monkeypatch.setenv("EVERGREEN_MODEL_CACHE_DIR", str(MODEL_CACHE))
    monkeypatch.setenv("EVERGREEN_MODEL_GGUF", str(exported.base_file))
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    done = runner.invoke(app, ["export", exported.version, "--format", "gguf", "--quant", "q8_0"])
    assert done.exit_code == 0, done.output
    written = tmp_path / f"evergreen-{exported.version}-q8_0.gguf"
    cached = exported.exporter.export(exported.version, "q8_0")
    assert written.read_bytes() == cached.path.read_bytes()
    assert done.stdout.split("\t") == [written.name, exported.version, f"{cached.size} bytes",
                                       f"sha256 {cached.sha256}\n"]
    assert f"llama-cli -m {written.name}" in done.stderr
    lora = runner.invoke(app, ["export", "live", "--adapter-only", "--quant", "f16", "--out", "lora.gguf"])
    assert lora.exit_code == 0, lora.output
    assert GGUFReader(tmp_path / "lora.gguf").get_field("general.type").contents() == "adapter"
    assert "llama-cli -m BASE.gguf --lora lora.gguf" in lora.stderr
    unknown = runner.invoke(app, ["export", "v0999"])
    assert unknown.exit_code == 1 and "cannot export v0999: unknown adapter version 'v0999'" in unknown.stderr
    four_bits = runner.invoke(app, ["export", exported.version, "--adapter-only", "--quant", "q4_0"])
    assert four_bits.exit_code == 1 and "f16 or q8_0, not q4_0" in four_bits.stderr
    bad = runner.invoke(app, ["export", exported.version, "--quant", "q5_1"])
    assert bad.exit_code == 2 and "'q5_1' is not one of" in bad.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evergreen-v0001-q8_0.gguf", "lora.gguf"]
