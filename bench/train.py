"""Training throughput: the update loop (`run_round`) against a plain PEFT training loop.

Workload: BANKING77 training tickets as classification examples on the default base model with
the default LoRA (r=16, all linear layers). The baseline, measured in the same run on the same
batches (`mixed_batches` with the same seed), is the loop every PEFT tutorial writes: forward
with `labels=` (the model's own loss over all positions), backward, clip, AdamW step. Two
workloads: without EWC or replay, and with EWC and a replay share. The two loops alternate
(A B, then B A, ...) and each figure is the median over repeats, so drift in the machine's load
falls on both. Throughput is tokens per second of this process's CPU time, on one thread by
default: on a shared machine wall time measures the neighbours (2-thread wall-clock runs here
varied 3x between repeats); wall-clock figures are reported too. Prints update-loop / plain
ratios per workload; writes bench/results/train.json.

    .venv/bin/python bench/train.py [--repeats 5] [--tickets 8] [--threads 1] [--base smollm2-135m]
    python bench/train.py --device cuda --precision bfloat16 --tickets 64   # the GPU preset

On a GPU the figures are wall-clock (the device synchronised before each reading: CPU time
there only measures the host launching kernels); they go to bench/results/train-gpu.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model

from learners.base_model import SMOLLM2, load_base, resolve_base_model
from learners.config import AdapterSettings, EwcSettings, TrainSettings
from learners.ewc import EwcPenalty, empirical_fisher, trainable
from learners.methods import peft_config
from learners.placement import device_of, place, synchronize, to_device
from learners.prompts import Example, classification_example
from learners.train import answer_loss, collate, mixed_batches, run_round
from service.settings import ModelSettings
from streams.datasets import load_tickets


def plain_loop(model: PeftModel, batches: Sequence[Sequence[Example]], cfg: TrainSettings, pad_id: int) -> int:
    """The textbook PEFT loop; returns the tokens it trained on."""
    params = list(trainable(model).values())
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    model.train()
    tokens, device = 0, device_of(model)
    for examples in batches:
        batch = collate(examples, pad_id)
        on_device = to_device(batch, device)
        loss = model(input_ids=on_device["input_ids"], attention_mask=on_device["attention_mask"],
                     labels=on_device["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum())
    model.eval()
    return tokens


def timed(run: Callable[[], int], device: torch.device) -> tuple[float, float]:
    """Tokens per CPU second and per wall-clock second of one run (a GPU's queue drained first)."""
    synchronize(device)
    cpu, wall = time.process_time(), time.perf_counter()
    tokens = run()
    synchronize(device)
    return tokens / (time.process_time() - cpu), tokens / (time.perf_counter() - wall)


def compare(model: PeftModel, new: list[Example], replay: list[Example], cfg: TrainSettings, pad_id: int,
            ewc: EwcPenalty | None, repeats: int) -> dict[str, float]:
    batches = mixed_batches(new, replay, cfg, random.Random(cfg.seed))  # what run_round draws

    def ours() -> int:
        return run_round(model, new, replay, cfg, pad_id, ewc).tokens

    def plain() -> int:
        return plain_loop(model, batches, cfg, pad_id)

    ours(), plain()  # warm-up: allocator, first-call paths
    runs: dict[str, list[tuple[float, float]]] = {"update_loop": [], "plain_peft": []}
    for repeat in range(repeats):
        order = [("update_loop", ours), ("plain_peft", plain)]
        for name, run in order if repeat % 2 == 0 else order[::-1]:
            runs[name].append(timed(run, device_of(model)))
    cpu = {k: statistics.median(r[0] for r in v) for k, v in runs.items()}
    wall = {k: statistics.median(r[1] for r in v) for k, v in runs.items()}
    return {"steps": len(batches), "update_loop_tokens_per_cpu_s": cpu["update_loop"],
            "plain_peft_tokens_per_cpu_s": cpu["plain_peft"], "ratio": cpu["update_loop"] / cpu["plain_peft"],
            "update_loop_tokens_per_wall_s": wall["update_loop"], "plain_peft_tokens_per_wall_s": wall["plain_peft"],
            "wall_ratio": wall["update_loop"] / wall["plain_peft"], "runs_cpu_wall": runs}  # type: ignore[dict-item]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tickets", type=int, default=8, help="New tickets per round (and replay pool).")
    parser.add_argument("--threads", type=int, default=1, help="Torch CPU threads.")
    parser.add_argument("--base", default=SMOLLM2)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (`model.device`).")
    parser.add_argument("--precision", default="float32", help="float32, bfloat16 or float16 (`model.precision`).")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    placement = place(args.device, args.precision, "--device", "--precision")
    gpu = placement.torch_device.type == "cuda"
    base, tokenizer = load_base(resolve_base_model(args.base, ModelSettings().cache_dir), placement)
    torch.manual_seed(0)
    model = get_peft_model(base, peft_config(AdapterSettings()))
    rows = load_tickets("banking77", "train")[: 2 * args.tickets]
    cfg = TrainSettings(batch_size=8, epochs=1, min_new_epochs=1, max_length=64, replay_ratio=0.25)
    examples = [classification_example(tokenizer, r.text, r.label or "", cfg.max_length) for r in rows]
    new, replay = examples[: args.tickets], examples[args.tickets:]
    pad_id = tokenizer.pad_token_id

    fisher = empirical_fisher(model, [collate(new[:8], pad_id)], answer_loss)
    ewc = EwcPenalty.anchored_at(model, fisher, EwcSettings().strength)
    result = {
        "benchmark": "train-throughput", "base": args.base, "tickets": args.tickets, "repeats": args.repeats,
        "batch_size": cfg.batch_size, "threads": torch.get_num_threads(), "machine": platform.machine(),
        "device": placement.device, "precision": placement.precision,
        "gpu": torch.cuda.get_device_name(placement.torch_device) if gpu else None,
        "trainable_parameters": sum(p.numel() for p in trainable(model).values()),
        "no_ewc_no_replay": compare(model, new, [], cfg, pad_id, None, args.repeats),
        "ewc_and_replay": compare(model, new, replay, cfg, pad_id, ewc, args.repeats),
    }
    out = Path(__file__).parent / "results" / ("train-gpu.json" if gpu else "train.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for name, target in (("no_ewc_no_replay", 0.95), ("ewc_and_replay", 0.85)):
        figures = result[name]
        assert isinstance(figures, dict)
        if gpu:
            print(f"{name} on {result['gpu']} ({placement.precision}): update loop "
                  f"{figures['update_loop_tokens_per_wall_s']:.0f}, plain PEFT "
                  f"{figures['plain_peft_tokens_per_wall_s']:.0f} tokens per second: ratio "
                  f"{figures['wall_ratio']:.3f} (target ≥ {target})")
            continue
        print(f"{name}: update loop {figures['update_loop_tokens_per_cpu_s']:.1f}, plain PEFT "
              f"{figures['plain_peft_tokens_per_cpu_s']:.1f} tokens per CPU second: ratio {figures['ratio']:.3f} "
              f"(target ≥ {target}; wall-clock ratio {figures['wall_ratio']:.3f})")


if __name__ == "__main__":
    main()
