"""The validation split a hyperparameter search scores its trials on (`learners.hpo`).

It is cut from the update's training rows, the new window's and the replay sample's alike, never
from the gate's probes: a search that picked its winner on the probes would leave the gate no
held-out test of it.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from learners.config import TrainSettings
from learners.gate import evaluate
from learners.prompts import ticket_examples
from learners.scoring import LabelScorer
from learners.train import answer_loss, collate
from streams.records import TicketRecord


def hold_out(rows: Sequence[TicketRecord], share: float, seed: int) -> tuple[list[TicketRecord], list[TicketRecord]]:
    """`rows` split into (training, held out), `share` of each label held out (rounded down), so
    every label keeps at least one training row; rows without a label are a stratum of their own.

    >>> rows = [TicketRecord(id=str(i), text="t", label="ab"[i % 2]) for i in range(10)] + [
    ...     TicketRecord(id="x", text="t", label="c")]
    >>> train, held = hold_out(rows, 0.4, seed=0)
    >>> len(train), sorted(r.label for r in held)
    (7, ['a', 'a', 'b', 'b'])
    """
    strata: dict[str | None, list[TicketRecord]] = defaultdict(list)
    for row in rows:
        strata[row.label].append(row)
    rng = random.Random(seed)
    train: list[TicketRecord] = []
    held: list[TicketRecord] = []
    for label in sorted(strata, key=lambda name: name or ""):
        stratum = rng.sample(strata[label], len(strata[label]))
        cut = min(int(len(stratum) * share), len(stratum) - 1)
        held += stratum[:cut]
        train += stratum[cut:]
    return train, held


@dataclass(frozen=True)
class ValidationSplit:
    """An update's training rows, less the held-out ones, and those held out."""

    new: list[TicketRecord]
    replay: list[TicketRecord]
    held: list[TicketRecord]

    @classmethod
    def of(cls, new: Sequence[TicketRecord], replay: Sequence[TicketRecord], share: float,
           seed: int) -> ValidationSplit:
        new_train, new_held = hold_out(new, share, seed)
        replay_train, replay_held = hold_out(replay, share, seed)
        return cls(new_train, replay_train, new_held + replay_held)


def answer_losses(model: nn.Module, tokenizer: PreTrainedTokenizerBase, rows: Sequence[TicketRecord],
                  cfg: TrainSettings) -> list[float]:
    """Each row's answer loss (nats/token, as training takes it, over every example it carries);
    a row that carries none (no label, no reply) has none."""
    losses = []
    with torch.no_grad():
        for row in rows:
            if examples := ticket_examples(tokenizer, [row], cfg.max_length, cfg.system_prompt):
                losses.append(float(answer_loss(model, collate(examples, tokenizer.pad_token_id))))
    return losses


@dataclass(frozen=True)
class ValidationScores:
    """A model's score on each held-out row (higher is better) and its mean answer loss on them."""

    rows: list[float]
    loss: float

    @property
    def value(self) -> float:
        return sum(self.rows) / len(self.rows)


def validation_scores(model: nn.Module, tokenizer: PreTrainedTokenizerBase, held: Sequence[TicketRecord],
                      labels: Sequence[str], cfg: TrainSettings) -> ValidationScores:
    """A model's scores on held-out rows, row by row, so that two trials can be compared row by row.

    Where held-out rows carry labels a row's score is the probability the model gives its label
    among every label, by the gate's own label scoring (`learners.gate.evaluate`); their mean is
    the accuracy a model answering at random by its own probabilities would get. Accuracy itself
    moves in steps of one row, and on the dozen or so rows a small window holds out, trials tie
    (three of four at 8 of 15 on an MCID window), leaving the sampler nothing to learn from. A
    window of replies alone has no labels, and each row is scored by minus its answer loss.
    """
    losses = answer_losses(model, tokenizer, held, cfg)
    loss = sum(losses) / len(losses) if losses else float("nan")
    labelled = [r for r in held if r.label]
    if not labelled:
        return ValidationScores([-x for x in losses], loss)
    score = evaluate(model, LabelScorer(tokenizer, labels), {0: labelled})[0]
    return ValidationScores(list(score.probabilities()), loss)
