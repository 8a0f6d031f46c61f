"""One training update on several processes: the same `train_adapter`, run under torchrun.

    torchrun --nproc_per_node=2 -m learners.distributed --base tiny-llama \\
        --live registry/versions/v0003 --records window.jsonl --out candidate/

Each rank loads the base and the live adapter, draws the same batches and trains on its share
of each; DDP averages the gradients (over NCCL with one GPU per rank, `--device cuda`; over gloo on
the CPU). `--device auto` picks CUDA when there is a GPU. Rank 0 writes the
candidate in the usual PEFT layout, so it is a registry version like any other. Without
torchrun the same command trains in one process. Gating stays with the service.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import distributed as dist

from learners.base_model import resolve_base_model
from learners.config import TrainSettings
from learners.ewc import trainable
from learners.placement import place
from learners.update_step import train_adapter
from streams.records import TicketRecord

LOG = logging.getLogger(__name__)
DEFAULT_CACHE = Path.home() / ".cache" / "evergreen" / "models"


def read_records(path: Path | None) -> list[TicketRecord]:
    if path is None:
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    return [TicketRecord.model_validate_json(line) for line in lines if line.strip()]


def rank_spread(model: torch.nn.Module) -> float:
    """Largest difference of any adapter weight between this rank and any other (0 alone)."""
    flat = torch.cat([p.detach().flatten() for p in trainable(model).values()])
    if not dist.is_initialized():
        return 0.0
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return max(float((other - flat).abs().max()) for other in gathered)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m learners.distributed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="`smollm2-135m`, `tiny-llama` or a model directory.")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="Converted base models.")
    parser.add_argument("--live", type=Path, required=True, help="Adapter directory to warm-start from.")
    parser.add_argument("--records", type=Path, required=True, help="JSON lines of the new window's tickets.")
    parser.add_argument("--replay", type=Path, help="JSON lines of replayed tickets.")
    parser.add_argument("--settings", type=Path, help="JSON of the `train` settings section.")
    parser.add_argument("--out", type=Path, required=True, help="Directory the candidate is written to.")
    parser.add_argument("--report", type=Path, help="Where rank 0 writes the round report (JSON).")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (each rank takes the GPU of its "
                                                         "LOCAL_RANK).")
    parser.add_argument("--precision", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    launched = dist.is_torchelastic_launched()
    placement = place(args.device, args.precision, "--device", "--precision")
    if launched and placement.torch_device.type == "cuda":  # one GPU per rank
        placement = place(f"cuda:{os.environ.get('LOCAL_RANK', '0')}", args.precision, "--device", "--precision")
        torch.cuda.set_device(placement.torch_device)
    if launched:  # torchrun's environment names the rank and the rendezvous
        dist.init_process_group("nccl" if placement.torch_device.type == "cuda" else "gloo")
    try:
        cfg = (TrainSettings.model_validate_json(args.settings.read_text(encoding="utf-8"))
               if args.settings else TrainSettings())
        base_path = resolve_base_model(args.base, args.cache_dir)
        model, _, report = train_adapter(read_records(args.records), read_records(args.replay), base_path,
                                         args.live, args.out, cfg, placement=placement)
        # Identical weights on every rank is what makes rank 0's copy the model all ranks trained.
        spread = rank_spread(model)
        rank, world = (dist.get_rank(), dist.get_world_size()) if launched else (0, 1)
        LOG.info("rank %d of %d: %d steps, loss %.4f, weight spread across ranks %g",
                 rank, world, report.steps, report.final_loss, spread)
        if spread != 0.0:
            raise RuntimeError(f"ranks diverged: adapter weights differ by up to {spread}")
        if rank == 0 and args.report is not None:
            args.report.write_text(json.dumps({**report.model_dump(), "world_size": world, "rank_spread": spread}))
    finally:
        if launched:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
