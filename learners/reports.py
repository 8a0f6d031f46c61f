"""What an update reports: training progress, the round's figures and the gate's verdict.

These are the contract between the learner and whoever reads it: the worker sends them to the
service (`learners.messages`), the registry keeps them in each version's `evergreen.json`, and
the API serves them, so `/openapi.json` documents them. Fields added after the first versions
were written have defaults, so every version's metadata still loads.

This module imports neither torch nor transformers: the service's registry reads it.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, computed_field

from learners.config import GateSettings

TEST_NAME = "exact one-sided McNemar test on the paired probe records"


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _nan_if_none(value: object) -> object:
    return math.nan if value is None else value


# A loss that may be NaN or infinite (a diverged round). JSON has no such numbers (a strict
# parser, a browser's among them, refuses the whole document), so it is written as null, in
# every JSON dump, and read back as NaN.
Loss = Annotated[float, BeforeValidator(_nan_if_none),
                 PlainSerializer(_finite_or_none, return_type=float | None, when_used="json")]


class Report(BaseModel):
    model_config = ConfigDict(frozen=True)


class Progress(Report):
    """One training step done."""

    step: int = Field(description="Steps done.")
    steps: int = Field(description="Steps of the round.")
    loss: Loss = Field(description="Answer loss of the step's batch (null if not finite).")
    penalty: Loss = Field(description="EWC penalty plus general-text drift of the step.")
    tokens_per_s: float = Field(description="Training throughput since the round started.")
    trial: int | None = Field(default=None, description="The search's trial this round is, from 1 "
                                                        "(`hpo.trials`); none for the candidate's own training.")
    trials: int | None = Field(default=None, description="Trials of the search, when this round is one.")


class TrainingProgress(Progress):
    """A step's progress as the training process reports it, with the time left."""

    eta_s: float | None = Field(default=None, description="Training seconds left, from the second step on.")


class PrivateRound(Report):
    """A differentially private round as its privacy accountant sees it: `steps` draws of a
    Poisson sample of the round's tickets at `sample_rate`, each with Gaussian noise of
    `noise_multiplier` × the clipping norm (`learners.privacy`)."""

    noise_multiplier: float
    sample_rate: float = Field(gt=0, le=1)
    steps: int = Field(gt=0)


class RoundReport(Report):
    steps: int
    skipped_steps: int = Field(default=0, description="Steps whose gradient was not finite, skipped (the "
                                                      "weights left as they were).")
    examples_new: int
    examples_replay: int
    final_loss: Loss
    tokens: int = Field(description="Tokens trained on (this rank's share under torchrun).")
    seconds: float
    threads: int | None = Field(default=None, description="Torch threads it trained with (unknown for old versions).")
    device: str | None = Field(default=None, description="Where it trained, `cpu` or `cuda:N` (unknown for old "
                                                         "versions).")
    precision: str | None = Field(default=None, description="The base model's weights' precision while it trained.")
    privacy: PrivateRound | None = Field(default=None, description="The round's privacy mechanism, if it trained "
                                                                    "with DP-SGD (`train.privacy`).")


class WindowScore(Report):
    """A version's accuracy on one window's probes (by label scoring), mean negative
    log-likelihood of the true label (over the probes it was scored for), and which probes were
    right and what they were answered (in probe order, for paired tests; kept out of the JSON)."""

    accuracy: float
    loss: Loss
    n: int = Field(description="Labelled probes scored.")
    correct: tuple[bool, ...] = Field(default=(), exclude=True, repr=False)
    truth: tuple[str, ...] = Field(default=(), exclude=True, repr=False)  # each probe's label
    answers: tuple[str, ...] = Field(default=(), exclude=True, repr=False)  # and the label it was given
    # The model's own answers, without the buffer's vote (`with_votes`); empty: the same as `answers`.
    model_answers: tuple[str, ...] = Field(default=(), exclude=True, repr=False)
    # The model's own log-probability of each label of `labels`, per probe (-inf: not on its shortlist).
    model_scores: tuple[tuple[float, ...], ...] = Field(default=(), exclude=True, repr=False)
    labels: tuple[str, ...] = Field(default=(), exclude=True, repr=False)
    majority_rate: float = Field(default=0.0, description="Accuracy of always answering the window's commonest label.")
    known_accuracy: float | None = Field(
        default=None, description="Accuracy among the labels the live version knew, on the probes of one of them.")
    known_correct: tuple[bool, ...] = Field(default=(), exclude=True, repr=False)
    shortlisted: int = Field(default=0, description="Probes judged among their shortlist of labels "
                                                    "(`gate.shortlist_labels`) rather than every label.")

    def probabilities(self, labels: Collection[str] | None = None) -> list[float]:
        """The model's own probability, per probe, of any of `labels` (default: the probe's own)."""
        if labels is None:
            return [math.exp(row[self.labels.index(label)])
                    for row, label in zip(self.model_scores, self.truth, strict=True)]
        columns = [i for i, label in enumerate(self.labels) if label in labels]
        return [min(1.0, sum(math.exp(row[i]) for i in columns)) for row in self.model_scores]


class ReplyScore(Report):
    """A version's replies on one window's reply probes: the mean answer loss (nats/token) and, on
    those it answered greedily, the mean ROUGE-L F1 against the reference reply and the share that
    match it (ROUGE-L ≥ 0.8). Per-probe figures, in probe order for paired tests, stay out of JSON."""

    n: int = Field(description="Reply probes scored.")
    loss: Loss
    answered: int = Field(description="Of them, answered greedily.")
    rouge_l: float | None = None
    matched: float | None = Field(default=None, description="Share of the answered with ROUGE-L ≥ 0.8.")
    losses: tuple[float, ...] = Field(default=(), exclude=True, repr=False)
    rouges: tuple[float, ...] = Field(default=(), exclude=True, repr=False)  # of the answered, in probe order
    reused: int = Field(default=0, exclude=True, repr=False)  # losses and answers read from the version's cache


class Check(Report):
    """One check of the gate: `observed` against `threshold`, and the test's p-value."""

    name: str
    passed: bool
    observed: Loss
    threshold: float
    p_value: float | None = Field(default=None, description="Of the exact test; none for a check without one.")
    detail: str = ""


class Canary(Report):
    """Mean per-token loss on general prompts: drift from the base measures general forgetting."""

    candidate: Loss
    live: Loss
    base: Loss

    @computed_field(description="Candidate loss minus base loss: the general ability lost.")  # type: ignore[prop-decorator]
    @property
    def drift(self) -> Loss:
        return self.candidate - self.base


class GateVerdict(Report):
    """The gate's verdict on a candidate and the figures of it that do not grow with the windows."""

    passed: bool
    reason: str = Field(description="The first failing check, or how many passed.")
    test: str = Field(default="", description="The statistical test behind the checks' p-values.")
    new_windows: tuple[int, ...] = Field(description="The windows the candidate learned.")
    canary: Canary | None = None
    thresholds: GateSettings = Field(description="The gate settings it was judged by.")
    retryable: bool = Field(default=False, description="Rejected only for what it did to earlier windows (their "
                                                       "forgetting, interference, replies), its own windows learned: "
                                                       "their tickets may be tried again "
                                                       "(`gate.retries_after_forgetting`).")
    at_fault: tuple[int, ...] = Field(default=(), description="Windows the rejection blames on their own tickets: "
                                                              "quarantined. The candidate's other new windows, "
                                                              "learned, may be tried again as if `retryable`. "
                                                              "Empty when retryable or passed.")
    seconds: float | None = Field(default=None, description="Time spent scoring and judging (unknown for old "
                                                            "versions).")
    live_scores_reused: int = Field(default=0, description="(Probe, label) scores of the live version read back "
                                                           "from when it was itself the candidate, not scored again.")
    live_scores_computed: int | None = Field(default=None, description="(Probe, label) scores the live version "
                                                                       "was run for (unknown for old versions).")
    live_replies_reused: int = Field(default=0, description="Reply figures (answer losses and greedy answers) of "
                                                            "the live version read back, not computed again.")


class GateReport(GateVerdict):
    """The gate's verdict on a candidate, with every score and check it was drawn from."""

    candidate: dict[int, WindowScore] = Field(description="The candidate's score on every window's probes.")
    live: dict[int, WindowScore] = Field(description="The live version's, on the same probes.")
    base: dict[int, WindowScore] = Field(default={}, description="The base model's, on the new windows' probes.")
    checks: list[Check] = Field(default=[], description="In the order judged: a drop check per earlier "
                                                        "window, then the pooled ones.")
    replies_candidate: dict[int, ReplyScore] = Field(default={}, description="The candidate's replies on "
                                                                             "earlier windows' reply probes.")
    replies_live: dict[int, ReplyScore] = Field(default={}, description="The live version's, on the same probes.")


class GateSummary(GateVerdict):
    """A gate report without its per-window figures (scores, and a check per earlier window): what
    a listing of versions serves, the same size at window 300 as at window 3."""

    checks_passed: int
    checks_failed: int

    @classmethod
    def of(cls, report: GateReport) -> GateSummary:
        failed = sum(1 for check in report.checks if not check.passed)
        return cls(**{name: getattr(report, name) for name in GateVerdict.model_fields},
                   checks_passed=len(report.checks) - failed, checks_failed=failed)


class TrialReport(Report):
    """One trial of an update's hyperparameter search (`learners.hpo`)."""

    number: int = Field(description="Its number in the service's study (over every update).")
    params: dict[str, int | float] = Field(description="The settings it trained with: `learning_rate`, `epochs`, "
                                                       "`replay_share` (with replay rows), and while the live "
                                                       "version is untrained `rank` and `alpha_ratio`.")
    value: float | None = Field(description="Its validation score, higher is better (the half-way score of a "
                                            "pruned trial; none if it failed).")
    loss: Loss = Field(description="Mean answer loss on the validation rows: ties of accuracy are broken by it.")
    steps: int = Field(description="Optimiser steps it ran.")
    seconds: float
    pruned: bool = Field(description="Stopped half-way: its score then was below the median of this update's "
                                     "trials.")
    winner: bool = False
    enqueued: bool = Field(default=False, description="Tried first: the previous update's winner, or in the "
                                                     "study's first search the settings as configured.")


class SearchReport(Report):
    """An update's hyperparameter search: its trials, and which settings trained the candidate."""

    metric: str = Field(description="`label_probability` (the mean probability of each validation row's label "
                                    "among every label, as the gate scores probes) or, with no labelled validation "
                                    "row, `-answer_loss`.")
    validation_rows: int = Field(description="Training rows held out to score the trials (new and replay).")
    trials: list[TrialReport]
    winner: dict[str, int | float] = Field(description="The winning trial's settings, which trained the candidate on "
                                                 "every training row.")
    opening_p_value: float | None = Field(
        default=None, description="The best challenger against the opening trial, row by row on the validation "
                                  "split: the paired test's p-value times the challengers that finished (none "
                                  "when the opening scored best or did not finish). Above `hpo.replace_p` the "
                                  "opening stays the winner.")
    seconds: float = Field(description="Time the search took, before the candidate's own training.")


class UpdateOutcome(Report):
    """What one update produced: the gate's verdict on its candidate, the round's figures, and
    the labels the candidate knows."""

    gate: GateReport
    train: RoundReport | None = Field(description="None for a candidate trained elsewhere and only gated here "
                                                  "(a federated round's, `learners.federated`).")
    labels: list[str]
    search: SearchReport | None = Field(default=None, description="The hyperparameter search that chose the "
                                                                  "candidate's settings (`hpo.trials` ≥ 2).")
