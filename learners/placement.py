"""Where a model runs and in what precision: `model.device` / `train.device` and `model.precision`.

A `Placement` is resolved once, at start-up, from the settings' words (`auto`, `cpu`, `cuda`,
`cuda:1`; `float32`, `bfloat16`, `float16`), so that a machine that cannot honour them fails
there, naming the setting, and never in the middle of an update.

The base model's weights are stored in the precision (half the memory in bf16 and fp16); adapter
weights stay in fp32 (PEFT upcasts them) and losses are taken in fp32. fp16 gradients may
underflow, so training in fp16 scales the loss (`grad_scaler`), as `torch.amp` does.
Tensors are built on the host and moved once per batch (`to_device`); results come back to the
host only where they are read (a progress figure, a label score).

>>> place("cpu", "float32")
Placement(device='cpu', precision='float32')
>>> place("cpu", "float16")
Traceback (most recent call last):
...
learners.placement.PlacementError: `model.precision` float16 needs a CUDA device; on the CPU use bfloat16 or float32
>>> place("tpu", "float32")
Traceback (most recent call last):
...
learners.placement.PlacementError: `model.device` must be auto, cpu, cuda or cuda:N, not 'tpu'
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from learners.config import Precision

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


class PlacementError(ValueError):
    """The settings ask for a device or precision this machine cannot give."""


class Placement(BaseModel):
    """A resolved device (`cpu`, `cuda:0`) and precision; travels in a training job as JSON."""

    model_config = ConfigDict(frozen=True)

    device: str = "cpu"
    precision: Precision = "float32"

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.precision]


CPU = Placement()


def place(device: str, precision: str, device_setting: str = "model.device",
          precision_setting: str = "model.precision") -> Placement:
    """The placement the settings ask for, checked against this machine."""
    if not _DEVICE.fullmatch(device):
        raise PlacementError(f"`{device_setting}` must be auto, cpu, cuda or cuda:N, not {device!r}")
    if precision not in DTYPES:
        raise PlacementError(f"`{precision_setting}` must be one of {', '.join(DTYPES)}, not {precision!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise PlacementError(f"`{device_setting}` is {device} but this machine has no CUDA device "
                                 f"(torch {torch.__version__}); use auto or cpu")
        index = int(device.partition(":")[2] or torch.cuda.current_device())
        if index >= torch.cuda.device_count():
            raise PlacementError(f"`{device_setting}` is {device} but this machine has "
                                 f"{torch.cuda.device_count()} CUDA device(s)")
        device = f"cuda:{index}"
        if precision == "bfloat16" and not torch.cuda.is_bf16_supported(including_emulation=False):
            raise PlacementError(f"`{precision_setting}` bfloat16 is not supported by "
                                 f"{torch.cuda.get_device_name(index)}; use float16 or float32")
    elif precision == "float16":
        raise PlacementError(f"`{precision_setting}` float16 needs a CUDA device; on the CPU use bfloat16 or float32")
    return Placement(device=device, precision=precision)  # type: ignore[arg-type]


def device_of(model: nn.Module) -> torch.device:
    """The device a model's weights are on (inputs go there)."""
    return next(model.parameters()).device


def base_dtype(model: nn.Module) -> str:
    """The precision of a model's frozen (base) weights, as `model.precision` names it."""
    frozen = next((p for p in model.parameters() if not p.requires_grad), None)
    dtype = (frozen if frozen is not None else next(model.parameters())).dtype
    return next((name for name, d in DTYPES.items() if d == dtype), str(dtype))


def grad_scaler(model: nn.Module) -> torch.amp.GradScaler:
    """Loss scaling for a model whose base weights are fp16; a pass-through for any other."""
    return torch.amp.GradScaler(device_of(model).type, enabled=base_dtype(model) == "float16")


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on a GPU, so that a timing covers it (nothing on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A batch of tensors on `device`, copied without blocking the host where it can be."""
    return {name: tensor.to(device, non_blocking=True) for name, tensor in batch.items()}
