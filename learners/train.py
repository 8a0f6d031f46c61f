"""One incremental training round, readable top to bottom (after nanoGPT's train.py)."""

from __future__ import annotations

import contextlib
import math
import random
import threading
import time
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from learners.config import TrainSettings
from learners.ewc import EwcPenalty, trainable
from learners.general import GeneralText, drift_from_base
from learners.placement import base_dtype, device_of, grad_scaler, to_device
from learners.prompts import IGNORE, Example
from learners.reports import Progress, RoundReport


class Cancelled(Exception):
    """The round was asked to stop; nothing it produced may be used."""


class Diverged(Exception):
    """Every step's gradient was infinite or NaN: the adapter did not move."""


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad a batch, so every answer sits in the last few positions (see `answer_loss`).

    Padding is masked out of attention and loss, and explicit position ids start every sequence
    at 0 whatever its padding (PEFT shifts them past prefix tuning's virtual tokens). Between
    real tokens only relative positions count under rotary embeddings, but prefix tuning's
    virtual keys carry no position, so there a real token's absolute position changes its
    output; label scoring and generation give the same positions.
    """
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        input_ids[row, width - len(e.input_ids):] = torch.tensor(e.input_ids)
        labels[row, width - len(e.labels):] = torch.tensor(e.labels)
        attention[row, width - len(e.input_ids):] = 1
    positions = (attention.cumsum(dim=1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention, "position_ids": positions}


def answer_loss(model: nn.Module, batch: dict[str, torch.Tensor],
                reduction: Literal["mean", "sum", "per_row"] = "mean") -> torch.Tensor:
    """Mean (or summed) cross-entropy over the answer tokens; `per_row`: each row's sum.

    The vocabulary projection is the largest matrix product of a small model; computing logits
    only for the positions that predict answer tokens (the last few, thanks to left padding)
    skips it for the whole prompt. The batch is moved to the model's device here.
    """
    answer_start = int((batch["labels"] != IGNORE).int().argmax(dim=1).min())  # read before the move: no sync
    batch = to_device(batch, device_of(model))
    labels = batch["labels"]
    keep = labels.shape[1] - answer_start + 1  # the position before the answer predicts its first token
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"], logits_to_keep=keep).logits
    targets = labels[:, labels.shape[1] - keep + 1:]
    losses = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                         ignore_index=IGNORE, reduction="none" if reduction == "per_row" else reduction)
    return losses.view(targets.shape).sum(dim=1) if reduction == "per_row" else losses


def answer_tokens(example: Example) -> int:
    """The tokens `answer_loss` averages over: the answer's (the first token predicts nothing)."""
    return sum(label != IGNORE for label in example.labels[1:])


def forward_passes(examples: Sequence[Example], max_tokens: int) -> list[Sequence[Example]]:
    """A batch as one forward pass if its padded size (rows x the longest row) is within
    `max_tokens`; otherwise split into passes that are, the shortest rows together (less padding).

    >>> def rows(*lengths): return [Example([1] * n, [1] * n) for n in lengths]
    >>> [len(p) for p in forward_passes(rows(5, 1, 4, 2), 20)], [len(p) for p in forward_passes(rows(5, 1, 4, 2), 10)]
    ([4], [2, 2])
    """
    if len(examples) * max(len(e.input_ids) for e in examples) <= max_tokens:
        return [examples]
    passes: list[list[Example]] = [[]]
    for example in sorted(examples, key=lambda e: len(e.input_ids)):
        if passes[-1] and (len(passes[-1]) + 1) * len(example.input_ids) > max_tokens:
            passes.append([])
        passes[-1].append(example)
    return passes


def lr_at(step: int, steps: int, cfg: TrainSettings) -> float:
    """Linear warm-up, then cosine decay to `min_lr_ratio` of the peak (re-warmed every round)."""
    warmup = max(1, int(cfg.warmup_fraction * steps))
    if step < warmup:
        return cfg.learning_rate * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    floor = cfg.min_lr_ratio * cfg.learning_rate
    return floor + 0.5 * (cfg.learning_rate - floor) * (1 + math.cos(math.pi * progress))


def replay_share(new: Sequence[Example], replay: Sequence[Example], ratio: float | str) -> float:
    """The share of each batch drawn from replay.

    `balanced` gives every label trained an equal share: the new window's labels split what the
    earlier ones leave. A fixed share, as in plain experience replay, under-weights earlier labels
    more with every window, and the model drifts towards the newest ones (recency bias in
    class-incremental learning). Reply examples carry no label; there every row counts the same.

    >>> intent = lambda name: Example([1], [1], name)
    >>> replay_share([intent("card")], [intent("rate"), intent("fee"), intent("card")], "balanced")
    0.6666666666666666
    >>> replay_share([intent("card")], [], "balanced"), replay_share([intent("card")], [intent("rate")], 0.3)
    (0.0, 0.3)
    """
    if not replay:
        return 0.0
    if not isinstance(ratio, str):
        return ratio
    new_labels = {e.intent for e in new}
    old_labels = {e.intent for e in replay} - new_labels
    if None in new_labels | old_labels:
        return len(replay) / (len(new) + len(replay))
    return len(old_labels) / (len(old_labels) + len(new_labels))


def max_steps(new: int, cfg: TrainSettings) -> int:
    """Most optimiser steps of an update with `new` new rows: `step_budget` times the steps the
    new rows alone take at `epochs`, whatever the replay beside them.

    >>> max_steps(40, TrainSettings(batch_size=8, epochs=3))  # 15 steps alone, twice that
    30
    """
    return math.ceil(cfg.step_budget * math.ceil(new * cfg.epochs / cfg.batch_size))


def mixed_batches(new: Sequence[Example], replay: Sequence[Example], cfg: TrainSettings,
                  rng: random.Random) -> list[list[Example]]:
    """`epochs` passes over the new rows; each batch topped up with replay rows (`replay_share`).

    At least one row of every batch is new, so the passes over the new rows always end. As
    earlier labels pile up, the new rows' share of a batch shrinks and the passes would take ever
    more steps; `step_budget` caps them at that multiple of the steps the new rows alone take,
    so an update costs the same at window 30 as at window 3. The new rows then get fewer passes,
    but never fewer than `min_new_epochs`: replay's share stops growing where it would take them.
    """
    ceiling = 1 - cfg.min_new_epochs / (cfg.step_budget * cfg.epochs)  # leaves the new rows their passes
    share = min(replay_share(new, replay, cfg.replay_ratio), ceiling)
    n_replay = min(round(cfg.batch_size * share), cfg.batch_size - 1)
    n_new = cfg.batch_size - n_replay
    steps = max(1, min(math.ceil(len(new) * cfg.epochs / n_new), max_steps(len(new), cfg)))
    order: list[Example] = []
    while len(order) < steps * n_new:
        order += rng.sample(list(new), len(new))  # reshuffle at each pass
    return [order[s * n_new:(s + 1) * n_new] + rng.sample(list(replay), min(n_replay, len(replay)))
            for s in range(steps)]


def data_parallel(model: nn.Module) -> tuple[nn.Module, int, int]:
    """The module to run forward passes through, this process's rank, and the world size.

    Under torchrun (a process group initialised, more than one rank) that is the model wrapped
    in DDP, which averages the gradients across ranks during `backward`; otherwise the model.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return model, 0, 1
    return DistributedDataParallel(model), dist.get_rank(), dist.get_world_size()


def run_round(model: nn.Module, new: Sequence[Example], replay: Sequence[Example], cfg: TrainSettings,
              pad_id: int, ewc: EwcPenalty | None = None,
              on_progress: Callable[[Progress], None] | None = None,
              cancel: threading.Event | None = None, general: GeneralText | None = None,
              midway: Callable[[nn.Module], None] | None = None) -> RoundReport:
    """Train the model's adapter on the new window plus replay, regularised by EWC and, with
    `general` text, by the KL drift from the base model on it (`learners.general`).

    `midway` is called once, after half the steps, with the model in eval mode: a search scores
    the trial there and may raise to stop it (`learners.hpo`).

    Under torchrun every rank draws the same batches (same seed) and trains on its share of
    each; gradients are averaged, so all ranks keep identical weights. `tokens` in the report
    and in progress counts this rank's share.
    """
    if not new:
        raise ValueError("no new training examples")
    net, rank, world = data_parallel(model)
    if cfg.batch_size < world:
        raise ValueError(f"`batch_size` {cfg.batch_size} is smaller than the {world} ranks")
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    batches = mixed_batches(new, replay, cfg, rng)
    params = list(trainable(model).values())
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    device, scaler = device_of(model), grad_scaler(model)
    model.train()
    started, tokens, loss_value, skipped = time.perf_counter(), 0, float("nan"), 0
    for step, examples in enumerate(batches):
        if cancel is not None and cancel.is_set():
            raise Cancelled(f"cancelled at step {step} of {len(batches)}")
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, len(batches), cfg)
        rows = examples[rank::world]
        passes = forward_passes(rows, cfg.max_batch_tokens)
        loss, answers = torch.zeros((), device=device), sum(answer_tokens(e) for e in rows)
        for at, part in enumerate(passes):  # each pass's activations are freed by its backward
            last = at == len(passes) - 1
            # Gradients add up over the passes; DDP averages them across ranks after the last one.
            with net.no_sync() if not last and isinstance(net, DistributedDataParallel) else contextlib.nullcontext():
                batch = collate(part, pad_id)
                tokens += int(batch["attention_mask"].sum())
                share = answer_loss(net, batch) if len(passes) == 1 else answer_loss(net, batch, "sum") / answers
                loss = loss + share.detach()
                if not last:
                    scaler.scale(share).backward()
        penalty = ewc.penalty(model) if ewc is not None else torch.zeros((), device=device)
        if general is not None:  # the same sentences on every rank, so DDP's average is unchanged
            penalty = penalty + cfg.keep_general * drift_from_base(model, general.batch())
        scaler.scale(share + penalty).backward()
        scaler.unscale_(optimizer)  # clipping sees the true gradients
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        # A step with a non-finite gradient (an fp16 overflow, which the scaler then scales down
        # from, or a NaN in any precision) is skipped: one bad batch must not poison the weights.
        if bool(torch.isfinite(norm)):
            scaler.step(optimizer)
        else:
            skipped += 1
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        # .item() syncs with the device once per step; the figures feed the progress bar.
        loss_value = loss.item()
        if on_progress is not None:
            elapsed = time.perf_counter() - started
            on_progress(Progress(step=step + 1, steps=len(batches), loss=loss_value, penalty=penalty.item(),
                                 tokens_per_s=tokens / elapsed))
        if midway is not None and step + 1 == len(batches) // 2:
            model.eval()
            midway(model)
            model.train()
    model.eval()
    if skipped == len(batches):
        raise Diverged(f"every one of the {skipped} steps had a non-finite gradient (base weights in "
                       f"{base_dtype(model)}): nothing was learned")
    return RoundReport(steps=len(batches), skipped_steps=skipped, examples_new=len(new), examples_replay=len(replay),
                       final_loss=loss_value, tokens=tokens, seconds=time.perf_counter() - started,
                       threads=torch.get_num_threads(), device=str(device), precision=base_dtype(model))
