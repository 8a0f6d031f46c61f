"""Registry versions exported as GGUF files for llama.cpp and ollama, cached in the registry.

`Exporter.export(version, quant, adapter_only)` is what `evergreen export` and
`GET /v1/adapters/{version}/export` both call. A model export is the version merged into the base
weights exactly as the server serves it (`service/merge.py`), written by `service/gguf_file.py`; an
adapter export is the LoRA adapter alone, for llama.cpp's `--lora` on the base model's GGUF.

Each export is made once per version, kind and quantization and kept in the version's
`exports/` folder with its sha256 (a version's weights never change); retention deletes it with
the version's weights. Files are written whole or not at all: a temporary file in the same folder,
fsynced, then renamed, and the sha256 written after it, so a file without its sha256 (a crash in
between) is made again rather than served. One export is made at a time per process: merging holds
a copy of the adapted weights (~430 MB on SmolLM2-135M).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig
from torch import nn
from transformers import AutoConfig

from learners.base_model import packaged_gguf
from service.export_config import ADAPTER_QUANTS, Quant
from service.gguf_file import ExportError, write_lora, write_model
from service.merge import build, lora_pairs, lora_scale, plain_lora, read_adapter
from service.registry import AdapterRegistry, RegistryError, fsync_dir, fsync_write
from service.settings import ModelSettings

LOG = logging.getLogger(__name__)

LIVE = "live"  # exports the version live when asked
MODEL, LORA = "model", "lora"  # the two kinds of export, first in their file names

__all__ = ["LIVE", "Export", "ExportError", "Exporter", "UnsupportedExport", "atomic_write", "base_gguf"]


class UnsupportedExport(ExportError):
    """An export no version can have (an adapter in 4 bits): the request, not the version, is wrong."""


@dataclass(frozen=True)
class Export:
    version: str  # the registry's name, `live` resolved
    path: Path
    sha256: str
    size: int

    @property
    def filename(self) -> str:
        """The name to save it under: `evergreen-v0003-q8_0.gguf`, `evergreen-v0003-lora-f16.gguf`."""
        kind, _, rest = self.path.name.partition("-")
        return f"evergreen-{self.version}-{rest}" if kind == MODEL else f"evergreen-{self.version}-{kind}-{rest}"


def base_gguf(model: ModelSettings) -> Path | None:
    """The base model's own GGUF, whose metadata and tokenizer model exports copy (`model.gguf`)."""
    return model.gguf or packaged_gguf(model.base)


def atomic_write(target: Path, write: Callable[[Path], None]) -> str:
    """Have `write` fill a temporary file beside `target`, fsync it and rename it to `target`;
    returns its sha256. Until the rename `target` is untouched; a failure leaves no temporary file."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        write(tmp)
        digest = hashlib.sha256()
        with tmp.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
            os.fsync(handle.fileno())
        tmp.replace(target)
        fsync_dir(target.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return digest.hexdigest()


class Exporter:
    """Makes and caches the GGUF exports of a registry's versions.

    Parameters
    ----------
    registry
        Where the versions are, and their exports go.
    base
        The pristine base model (read, never changed), called only when an export must be made.
    model_dir
        The base model's directory: its config and tokenizer.json.
    base_gguf
        The base model's own GGUF, whose metadata model exports copy (None: written from `model_dir`).
    """

    def __init__(self, registry: AdapterRegistry, base: Callable[[], nn.Module], model_dir: Path,
                 base_gguf: Path | None) -> None:
        self.registry = registry
        self.base = base
        self.model_dir = model_dir
        self.base_gguf = base_gguf
        self.config = AutoConfig.from_pretrained(model_dir)
        self._lock = threading.Lock()

    def resolve(self, version: str) -> str:
        """`version` as a registry name (`live`: the live one); RegistryError if none is live."""
        if version != LIVE:
            return version
        live = self.registry.live
        if live is None:
            raise RegistryError("no version is live yet")
        return live

    def export(self, version: str, quant: Quant, adapter_only: bool = False) -> Export:
        """`version` (a name or `live`) as a GGUF file: the merged model, or with `adapter_only`
        its LoRA adapter. Raises RegistryError (unknown or pruned version), ExportError (a version
        that cannot be exported so), UnsupportedExport, UnsafeAdapter (weights not finite)."""
        if adapter_only and quant not in ADAPTER_QUANTS:
            raise UnsupportedExport(f"an adapter is exported {' or '.join(ADAPTER_QUANTS)}, not {quant}: its small "
                                    "low-rank factors lose too much in 4 bits (llama.cpp's converter has no such type)")
        name = self.resolve(version)
        target = self.registry.exports(name) / f"{LORA if adapter_only else MODEL}-{quant}.gguf"
        with self._lock:
            cached = _cached(name, target)
            if cached is not None:
                return cached
            started = time.perf_counter()
            target.unlink(missing_ok=True)  # a file whose sha256 was never written is not trusted
            write = self._adapter(name, quant) if adapter_only else self._model(name, quant)
            sha256 = atomic_write(target, write)
            fsync_write(_sha_path(target), sha256.encode())
            LOG.info("exported %s as %s (%.1f MB) in %.1f s", name, target.name, target.stat().st_size / 1e6,
                     time.perf_counter() - started)
            return Export(name, target, sha256, target.stat().st_size)

    def _read(self, name: str) -> tuple[PeftConfig, dict[str, torch.Tensor]]:
        config, weights = read_adapter(self.registry.path(name), name)
        if config.is_prompt_learning:
            raise ExportError(f"version {name} is {_method(config)}, prompt learning: its virtual tokens cannot be "
                              "merged into the weights, and llama.cpp takes no prompt-learning adapter, so it has "
                              "no GGUF export")
        return config, weights

    def _model(self, name: str, quant: Quant) -> Callable[[Path], None]:
        config, weights = self._read(name)
        merged = build(self.base(), name, config, weights).model  # as the server serves it
        weights_of = dict(merged.named_parameters())  # tied weights once, as llama.cpp wants them
        return lambda path: write_model(path, self.config, weights_of, quant, self.model_dir, self.base_gguf,
                                        f"evergreen {name}")

    def _adapter(self, name: str, quant: Quant) -> Callable[[Path], None]:
        config, weights = self._read(name)
        pairs = lora_pairs(weights) if plain_lora(config) else None
        if pairs is None:
            raise ExportError(f"version {name} is {_method(config)}, not plain LoRA: an adapter-only GGUF needs "
                              "LoRA's A and B; export the merged model instead")
        assert isinstance(config, LoraConfig)
        return lambda path: write_lora(path, self.config, pairs, lora_scale(config), quant, f"evergreen {name} LoRA")


def _method(config: PeftConfig) -> str:
    """`lora`, `prefix_tuning`, `ia3`; LoRA with DoRA or patterns says so."""
    method = str(config.peft_type.value).lower()
    return f"{method} with options llama.cpp cannot apply (DoRA, rank or alpha patterns...)" if (
        method == "lora" and not plain_lora(config)) else method


def _sha_path(target: Path) -> Path:
    return target.with_name(target.name + ".sha256")


def _cached(name: str, target: Path) -> Export | None:
    try:
        sha256 = _sha_path(target).read_text().strip()
        size = target.stat().st_size
    except FileNotFoundError:
        return None
    return Export(name, target, sha256, size)
