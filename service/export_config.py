"""What an export can be asked for: the choices `evergreen export` and the export route share.

Kept apart from `service/gguf_file.py`, which needs torch, so the command line can list them
without importing it.
"""

from __future__ import annotations

from typing import Literal

ExportFormat = Literal["gguf"]
Quant = Literal["f16", "q8_0", "q4_0"]  # the matrices' type; vectors (norms) stay f32
ADAPTER_QUANTS: tuple[Quant, ...] = ("f16", "q8_0")  # llama.cpp's own LoRA converter offers no 4-bit type
