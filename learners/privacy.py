"""Differentially private rounds: DP-SGD on the adapter (Opacus), accounted over every round.

The adapter is what may leave a site (to a hub, an export, a registry others read), so under
`train.privacy` a round bounds what any one ticket can do to it (Abadi et al. 2016): each step
draws a Poisson sample of the round's tickets, new and replayed alike; each ticket's gradient
(its label and reply examples together) is clipped to `max_grad_norm`; Gaussian noise of
`noise_multiplier` × that norm is added to the sum. A round is then a subsampled Gaussian
mechanism, `PrivateRound`; Opacus's RDP accountant composes every round the service ever ran,
so a ticket replayed in each of them is counted in each, and `epsilon` is the whole life's spend.

The loop is `learners.train.run_round`'s with the batches drawn and the gradient formed as
above; the privacy settings' description says which of its other parts these rounds leave out.
"""

from __future__ import annotations

import math
import random
import secrets
import threading
import time
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import distributed as dist
from torch import nn

from learners.config import TrainSettings
from learners.ewc import trainable
from learners.placement import base_dtype, device_of
from learners.prompts import Example
from learners.reports import PrivateRound, Progress, RoundReport
from learners.train import Cancelled, answer_loss, answer_tokens, collate, lr_at, max_steps

# Opacus's hooks see the frozen base's inputs need no gradient and torch warns that the hook fires on
# the module's outputs: the outputs' gradients are the ones the per-example gradients need.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with respect "
                                          "to module outputs", category=UserWarning)


def mechanism(tickets: int, new: int, cfg: TrainSettings) -> PrivateRound:
    """The round `private_round` runs on `tickets` tickets, `new` of them the new window's.

    Known before the round starts, so a service can refuse one its budget cannot pay for. A
    step samples `batch_size` tickets in expectation; `epochs` passes over them all, within
    the step budget the new rows alone set (`train.step_budget`), as every update's.

    >>> cfg = TrainSettings(batch_size=8, epochs=3)
    >>> mechanism(40, 40, cfg)
    PrivateRound(noise_multiplier=1.0, sample_rate=0.2, steps=15)
    >>> mechanism(400, 40, cfg).steps  # replay shares the budget: twice the new tickets' 15 steps
    30
    """
    steps = min(math.ceil(tickets * cfg.epochs / cfg.batch_size), max_steps(new, cfg))
    return PrivateRound(noise_multiplier=cfg.privacy.noise_multiplier,
                        sample_rate=min(1.0, cfg.batch_size / tickets), steps=max(1, steps))


def epsilon(rounds: Sequence[PrivateRound], delta: float) -> float:
    """The ε these rounds spent together at `delta` (Opacus's RDP accountant); 0 for none.

    >>> one = PrivateRound(noise_multiplier=1.0, sample_rate=0.2, steps=15)
    >>> 0 < epsilon([one], 1e-6) < epsilon([one, one], 1e-6), epsilon([], 1e-6)
    (True, 0.0)
    """
    if not rounds:
        return 0.0
    from opacus.accountants import RDPAccountant  # see `private_round`

    accountant = RDPAccountant()
    accountant.history = [(r.noise_multiplier, r.sample_rate, r.steps) for r in rounds]
    return float(accountant.get_epsilon(delta))


def ticket_passes(tickets: Sequence[Sequence[Example]], max_tokens: int) -> list[list[int]]:
    """The drawn tickets (by index) as forward passes of at most `max_tokens` padded tokens each
    (`train.max_batch_tokens`), every ticket whole in one pass, the shortest together; a ticket
    over the bound alone is a pass of its own, one without examples in none (its gradient is
    zero). A large private batch, which DP-SGD needs, then costs no more memory than a
    non-private one: a pass's activations and per-example gradients are freed by its backward.

    >>> def ticket(*lengths): return [Example([1] * n, [1] * n) for n in lengths]
    >>> ticket_passes([ticket(5), ticket(1, 2), ticket(4), ticket(9)], 12)
    [[1, 2], [0], [3]]
    >>> ticket_passes([[], ticket(3)], 10), ticket_passes([], 10)
    ([[1]], [])
    """
    width = [max((len(e.input_ids) for e in t), default=0) for t in tickets]
    passes: list[list[int]] = []
    rows = longest = 0
    for index in sorted((i for i, t in enumerate(tickets) if t), key=width.__getitem__):
        if not passes or (rows + len(tickets[index])) * max(longest, width[index]) > max_tokens:
            passes.append([])
            rows = longest = 0
        passes[-1].append(index)
        rows, longest = rows + len(tickets[index]), max(longest, width[index])
    return passes


def ticket_gradients(net: nn.Module, params: dict[str, nn.Parameter], tickets: Sequence[Sequence[Example]],
                     pad_id: int, max_tokens: int) -> tuple[torch.Tensor, int]:
    """Each ticket's gradient as every parameter's `grad_sample`, tickets × its shape, for the DP
    optimizer to clip and noise (`net`: the model in Opacus's `GradSampleModule`). A ticket's
    examples are summed first: the ticket is what is clipped, so one with a label and a reply
    moves the adapter no more than one with a label alone. Computed in `ticket_passes`; returns
    every example's answer loss and the tokens read."""
    device = device_of(net)
    sums = {name: p.new_zeros((len(tickets), *p.shape)) for name, p in params.items()}
    losses, tokens = [torch.zeros(0, device=device)], 0
    for part in ticket_passes(tickets, max_tokens):
        rows = [e for i in part for e in tickets[i]]
        batch = collate(rows, pad_id)
        tokens += int(batch["attention_mask"].sum())
        answers = torch.tensor([max(1, answer_tokens(e)) for e in rows], device=device)
        pass_losses = answer_loss(net, batch, "per_row") / answers
        pass_losses.sum().backward()
        owners = torch.tensor([i for i in part for _ in tickets[i]], device=device)
        for name, p in params.items():
            if p.grad_sample is None:  # IA3's scaling vectors, for one
                raise ValueError(f"cannot train `{name}` privately: Opacus computes no per-ticket gradient for it")
            sums[name].index_add_(0, owners, p.grad_sample)
            p.grad_sample = None  # the next pass's backward starts its own
        losses.append(pass_losses.detach())
    for name, p in params.items():
        p.grad_sample = sums[name]
    return torch.cat(losses), tokens


def private_round(model: nn.Module, new: Sequence[Sequence[Example]], replay: Sequence[Sequence[Example]],
                  cfg: TrainSettings, pad_id: int, on_progress: Callable[[Progress], None] | None = None,
                  cancel: threading.Event | None = None) -> RoundReport:
    """Train the model's adapter with DP-SGD on the new and replayed tickets (each a ticket's
    examples; a ticket with none still counts, as the accountant counts it).

    The noise and the sampling come from the operating system's entropy, never from
    `train.seed`: noise whose seed is known can be subtracted again.
    """
    if dist.is_initialized() and dist.get_world_size() > 1:
        raise ValueError("private rounds run in one process: `train.privacy` with torchrun is not supported")
    # Imported when first needed: 0.8 s on 2 cores that every service and training process
    # without privacy (the default) would otherwise pay at start.
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    tickets = [*new, *replay]
    plan = mechanism(len(tickets), len(new), cfg)
    params = trainable(model)
    device = device_of(model)
    net = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    schedule = cfg.model_copy(update={"learning_rate": cfg.privacy.learning_rate})  # for `lr_at`
    adamw = torch.optim.AdamW(params.values(), lr=schedule.learning_rate, weight_decay=cfg.weight_decay)
    optimizer = DPOptimizer(adamw, noise_multiplier=plan.noise_multiplier, max_grad_norm=cfg.privacy.max_grad_norm,
                            expected_batch_size=max(1, round(plan.sample_rate * len(tickets))), loss_reduction="mean",
                            generator=torch.Generator(device=device).manual_seed(secrets.randbits(63)))
    draw = random.SystemRandom()
    model.train()
    started, tokens, loss_value = time.perf_counter(), 0, float("nan")
    try:
        for step in range(plan.steps):
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"cancelled at step {step} of {plan.steps}")
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, plan.steps, schedule)
            # Nobody drawn (or only tickets without examples): the step is noise alone, as the
            # accountant assumes.
            drawn = [t for t in tickets if draw.random() < plan.sample_rate]
            losses, step_tokens = ticket_gradients(net, params, drawn, pad_id, cfg.max_batch_tokens)
            tokens += step_tokens
            if len(losses):
                loss_value = float(losses.mean())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if on_progress is not None:
                on_progress(Progress(step=step + 1, steps=plan.steps, loss=loss_value, penalty=0.0,
                                     tokens_per_s=tokens / (time.perf_counter() - started)))
    finally:
        net._close()  # the hooks off, so scoring and saving see the plain model
        model.eval()
    return RoundReport(steps=plan.steps, examples_new=sum(map(len, new)), examples_replay=sum(map(len, replay)),
                       final_loss=loss_value, tokens=tokens, seconds=time.perf_counter() - started,
                       threads=torch.get_num_threads(), device=str(device), precision=base_dtype(model),
                       privacy=plan)
