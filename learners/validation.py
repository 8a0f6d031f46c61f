"""The validation split a hyperparameter search scores its trials on (`learners.hpo`).

It is cut from the update's training rows, the new window's and the replay sample's alike, never
from the gate's probes: a search that picked its winner on the probes would leave the gate no
held-out test of it.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from learners.config import TrainSettings
from learners.gate import Votes, score_probes, vote_matrix
from learners.prompts import ticket_examples
from learners.scoring import LabelScorer, with_votes
from learners.train import answer_loss, answer_tokens, collate
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
    a row that carries none (no label, no reply) has none. The examples run `cfg.batch_size` at a
    time, the shortest together (less padding)."""
    examples = [(at, e) for at, row in enumerate(rows)
                for e in ticket_examples(tokenizer, [row], cfg.max_length, cfg.system_prompt)]
    examples.sort(key=lambda item: len(item[1].input_ids))
    summed, tokens = [0.0] * len(rows), [0] * len(rows)
    with torch.no_grad():
        for start in range(0, len(examples), cfg.batch_size):
            batch = examples[start:start + cfg.batch_size]
            losses = answer_loss(model, collate([e for _, e in batch], tokenizer.pad_token_id), "per_row")
            for (at, example), loss in zip(batch, losses.tolist(), strict=True):
                summed[at] += loss
                tokens[at] += answer_tokens(example)
    return [loss / n for loss, n in zip(summed, tokens, strict=True) if n]


@dataclass(frozen=True)
class ValidationScores:
    """A model's score on each held-out row (higher is better) and its mean answer loss on them."""

    rows: list[float]
    loss: float

    @property
    def value(self) -> float:
        """The mean row score (nan without rows)."""
        return sum(self.rows) / len(self.rows) if self.rows else math.nan


def validation_scores(model: nn.Module, tokenizer: PreTrainedTokenizerBase, held: Sequence[TicketRecord],
                      labels: Sequence[str], cfg: TrainSettings, votes: Votes | None = None,
                      vote_weight: float = 0.0) -> ValidationScores:
    """A model's scores on held-out rows, row by row, so that two trials can be compared row by row.

    Where held-out rows carry labels a row's score is the probability its label gets among every
    label in the answer `/v1/classify` would give: the model's scores by the gate's own label
    scoring, weighed with the buffer's `votes` on the row (`with_votes`, the row's own stored copy
    not voting). A trial is chosen for what users get: on an MCID window, a trial that beat the
    configured settings on the model's own probabilities learned the window worse once the vote
    was weighed in (0.81 against 0.85 served). The mean of the scores is the accuracy an answer
    drawn at random by those probabilities would get. Accuracy itself moves in steps of one row,
    and on the dozen or so rows a small window holds out, trials tie (three of four at 8 of 15 on
    an MCID window), leaving the sampler nothing to learn from. A window of replies alone has no
    labels, and each row is scored by minus its answer loss.
    """
    losses = answer_losses(model, tokenizer, held, cfg)
    loss = sum(losses) / len(losses) if losses else float("nan")
    labelled = [r for r in held if r.label in labels]
    if not labelled:
        return ValidationScores([-x for x in losses], loss)
    scorer = LabelScorer(tokenizer, labels)
    with torch.no_grad():
        matrix = score_probes(model, scorer, {0: labelled})[0]
    shares = vote_matrix(matrix.records, scorer.labels, votes)
    answer = torch.log_softmax(with_votes(matrix.scores, shares, vote_weight), dim=1)
    truth = torch.tensor([[scorer.labels.index(r.label or "")] for r in matrix.records])
    return ValidationScores(answer.gather(1, truth)[:, 0].exp().tolist(), loss)
