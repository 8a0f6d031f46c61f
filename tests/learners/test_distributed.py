"""The update runs unchanged under torchrun (DDP over gloo, two CPU ranks) and writes the same
adapter format as one process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from peft import PeftModel
from safetensors.torch import load_file

from learners.base_model import TINY_LLAMA, load_base
from learners.config import AdapterSettings
from learners.update_step import initial_adapter
from streams.records import TicketRecord
from tests.conftest import MODEL_CACHE, TINY_TRAIN

LABELS = ("card_arrival", "exchange_rate")


def run(command: list[str], out: Path, tmp: Path) -> dict[str, object]:
    args = ["-m", "learners.distributed", "--base", TINY_LLAMA, "--cache-dir", str(MODEL_CACHE),
            "--live", str(tmp / "live"), "--records", str(tmp / "window.jsonl"),
            "--settings", str(tmp / "train.json"), "--out", str(out), "--report", str(out.with_suffix(".json"))]
    done = subprocess.run([sys.executable, *command, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.with_suffix(".json").read_text())  # type: ignore[no-any-return]


def test_two_ranks_write_the_single_process_format_and_stay_in_sync(tiny_llama: Path, tmp_path: Path) -> None:
    # One row a forward pass (`max_batch_tokens` 1): each rank sums its passes before DDP averages the ranks.
    cfg = TINY_TRAIN.model_copy(update={"epochs": 2, "adapter": AdapterSettings(rank=4), "max_batch_tokens": 1})
    initial_adapter(tiny_llama, tmp_path / "live", cfg.adapter, cfg.seed)
    (tmp_path / "train.json").write_text(cfg.model_dump_json())
    (tmp_path / "window.jsonl").write_text("\n".join(
        TicketRecord(id=str(i), text=f"my {('card', 'rate')[i % 2]} question {i}", label=LABELS[i % 2])
        .model_dump_json() for i in range(16)))

    single = run([], tmp_path / "single", tmp_path)
    ranks = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"],
                tmp_path / "ddp", tmp_path)

    assert single["world_size"] == 1 and ranks["world_size"] == 2
    assert ranks["rank_spread"] == 0.0  # every rank ended with identical adapter weights
    assert ranks["steps"] == single["steps"]  # the same global batches, split between the ranks
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == sorted(
        p.name for p in (tmp_path / "single").iterdir())
    one, two = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("single", "ddp"))
    assert {k: v.shape for k, v in one.items()} == {k: v.shape for k, v in two.items()}
    live = load_file(str(tmp_path / "live" / "adapter_model.safetensors"))
    assert any(not (two[k] == live[k]).all() for k in two)  # the ranks trained the adapter
    PeftModel.from_pretrained(load_base(tiny_llama)[0], tmp_path / "ddp")
