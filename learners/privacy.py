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


def per_ticket(grad_sample: torch.Tensor, owners: torch.Tensor, tickets: int) -> torch.Tensor:
    """Per-example gradients summed into per-ticket ones: the ticket is what is clipped, so a
    ticket with a label and a reply moves the adapter no more than one with a label alone.

    >>> per_ticket(torch.tensor([[1.0], [2.0], [4.0]]), torch.tensor([0, 0, 2]), 3).tolist()
    [[3.0], [0.0], [4.0]]
    """
    return grad_sample.new_zeros((tickets, *grad_sample.shape[1:])).index_add_(0, owners, grad_sample)


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
    params = list(trainable(model).values())
    device = device_of(model)
    net = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    optimizer = DPOptimizer(torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay),
                            noise_multiplier=plan.noise_multiplier, max_grad_norm=cfg.privacy.max_grad_norm,
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
                group["lr"] = lr_at(step, plan.steps, cfg)
            chosen = [t for t in tickets if draw.random() < plan.sample_rate]
            rows = [e for t in chosen for e in t]
            if rows:
                batch = collate(rows, pad_id)
                tokens += int(batch["attention_mask"].sum())
                answers = torch.tensor([max(1, answer_tokens(e)) for e in rows], device=device)
                losses = answer_loss(net, batch, "per_row") / answers
                losses.sum().backward()
                owners = torch.tensor([i for i, t in enumerate(chosen) for _ in t], device=device)
                for p in params:
                    p.grad_sample = per_ticket(p.grad_sample, owners, len(chosen))
                loss_value = float(losses.detach().mean())
            else:  # nobody drawn: the step is noise alone, as the accountant assumes
                for p in params:
                    p.grad_sample = p.new_zeros((0, *p.shape))
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
