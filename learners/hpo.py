"""Hyperparameter search inside one update, with Optuna, in the update's training process.

Each trial is a normal update's training (`train_adapter`, warm-started from the live version)
on the training rows less a validation split (`learners.validation`), with settings the study
suggests, scored on that split. Half-way through, the trial reports its score, and the median
pruner stops it when it is below the median of this search's trials at that point. The winner's
settings then train the candidate on every training row (the worker does that with the usual
`train_candidate`), so the rows held out for validation are learned too and the candidate is
made exactly as an update with those settings would make it.

One study serves the service's whole life: a journal file (append-only, so a process killed
mid-search leaves it readable), a TPE sampler that starts modelling after a few trials, and the
last winner tried first in the next search. That opening trial stays the winner unless a
challenger beats it beyond noise, row by row on the validation split (`hpo.replace_p`): the best
of several trials on a few dozen rows is partly the luck of those rows.

A LoRA adapter's rank is its shape, and its alpha scales what it learned, so a warm start keeps
both: they are searched only while the live version is the untrained first one, whose trials
then start from a fresh adapter of the trial's rank (an untrained LoRA adapter answers as the
base model does, whatever its rank).
"""

from __future__ import annotations

import logging
import math
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage, InMemoryStorage, JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from torch import nn
from transformers import PreTrainedTokenizerBase

from learners.base_model import load_tokenizer
from learners.config import TrainSettings
from learners.gate import Votes
from learners.hpo_config import HpoSettings
from learners.placement import CPU, Placement
from learners.reports import Progress, SearchReport, TrialReport
from learners.stats import paired_increase
from learners.train import Diverged
from learners.update_step import initial_adapter, train_adapter
from learners.validation import ValidationScores, ValidationSplit, validation_scores
from replay.buffer import Snapshot

LOG = logging.getLogger(__name__)
STUDY_NAME = "evergreen-updates"
WINNER = "winner"  # the study's user attribute: the last search's winning settings


@dataclass(frozen=True)
class Winner:
    """What trains the candidate: the winning settings, the adapter to start from (a fresh one
    when the rank was searched; None: the live version), and the search's report."""

    cfg: TrainSettings
    start_dir: Path | None
    report: SearchReport


def open_study(journal: Path | None, hpo: HpoSettings, seed: int) -> optuna.Study:
    """The service's one study, from its journal file (created on first use); in memory without one."""
    storage: BaseStorage = InMemoryStorage()
    if journal is not None:
        journal.parent.mkdir(parents=True, exist_ok=True)
        storage = JournalStorage(JournalFileBackend(str(journal)))
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=0, n_warmup_steps=0, n_min_trials=2)
              if hpo.pruning else optuna.pruners.NopPruner())
    return optuna.create_study(storage=storage, study_name=STUDY_NAME, direction="maximize", load_if_exists=True,
                               sampler=optuna.samplers.TPESampler(n_startup_trials=hpo.startup_trials, seed=seed),
                               pruner=pruner)


def suggest(trial: optuna.Trial, hpo: HpoSettings, shape_searched: bool, replaying: bool) -> dict[str, float]:
    """A trial's settings, one per range set: rank and alpha only when `shape_searched`, the
    replay share only when there are replay rows (`replaying`)."""
    params: dict[str, float] = {}
    if hpo.learning_rate is not None:
        params["learning_rate"] = trial.suggest_float("learning_rate", hpo.learning_rate.low,
                                                      hpo.learning_rate.high, log=True)
    if hpo.epochs is not None:
        params["epochs"] = trial.suggest_float("epochs", hpo.epochs.low, hpo.epochs.high)
    if hpo.replay_share is not None and replaying:
        params["replay_share"] = trial.suggest_float("replay_share", hpo.replay_share.low, hpo.replay_share.high)
    if shape_searched and hpo.rank is not None:
        params["rank"] = trial.suggest_categorical("rank", hpo.rank)
    if shape_searched and hpo.alpha_ratio is not None:
        params["alpha_ratio"] = trial.suggest_float("alpha_ratio", hpo.alpha_ratio.low, hpo.alpha_ratio.high)
    return params


def within(params: dict[str, Any], hpo: HpoSettings, shape_searched: bool) -> dict[str, Any]:
    """The settings of `params` that the search space holds now (the ranges may have changed
    since a winner was found; Optuna would take a value outside them as it is)."""
    ranges = {"learning_rate": hpo.learning_rate, "epochs": hpo.epochs, "replay_share": hpo.replay_share,
              "alpha_ratio": hpo.alpha_ratio if shape_searched else None}
    kept = {name: v for name, v in params.items() if (r := ranges.get(name)) is not None and r.contains(v)}
    if shape_searched and hpo.rank is not None and params.get("rank") in hpo.rank:
        kept["rank"] = params["rank"]
    return kept


def trial_settings(cfg: TrainSettings, params: dict[str, float]) -> TrainSettings:
    """`cfg` with a trial's settings in place (validated like any settings)."""
    values = cfg.model_dump()
    if "learning_rate" in params:
        values["learning_rate"] = params["learning_rate"]
    if "epochs" in params:
        values["epochs"] = params["epochs"]
        values["min_new_epochs"] = min(cfg.min_new_epochs, params["epochs"])
    if "replay_share" in params:
        values["replay_ratio"] = params["replay_share"]
    rank = int(params.get("rank", cfg.adapter.rank))
    if "rank" in params or "alpha_ratio" in params:
        values["adapter"]["rank"] = rank
        values["adapter"]["alpha"] = max(1, round(params.get("alpha_ratio", cfg.adapter.alpha / cfg.adapter.rank)
                                                  * rank))
    return TrainSettings.model_validate(values)


def reshaped(params: dict[str, float]) -> bool:
    return "rank" in params or "alpha_ratio" in params


class Search:
    """One update's search: `run` trains and scores `hpo.trials` trials, then names the winner."""

    def __init__(self, snapshot: Snapshot, base_path: Path, live_dir: Path, live_untrained: bool,
                 cfg: TrainSettings, hpo: HpoSettings, journal: Path | None, scratch: Path,
                 on_progress: Callable[[Progress], None] | None = None,
                 cancel: threading.Event | None = None, placement: Placement = CPU,
                 votes: Votes | None = None, vote_weight: float = 0.0) -> None:
        self.snapshot, self.base_path, self.live_dir = snapshot, base_path, live_dir
        self.placement = placement
        self.votes, self.vote_weight = votes, vote_weight  # the buffer's on the held-out rows (`validation_scores`)
        self.cfg, self.hpo, self.scratch = cfg, hpo, scratch
        self.on_progress, self.cancel = on_progress, cancel
        self.shape_searched = live_untrained and cfg.adapter.method == "lora"
        self.split = ValidationSplit.of(snapshot.new, snapshot.replay, hpo.validation_share, cfg.seed)
        # A seed per update: the same seed in every update would draw the same random trials.
        self.study = open_study(journal, hpo, cfg.seed + max(snapshot.new_windows, default=0))
        self.tokenizer: PreTrainedTokenizerBase = load_tokenizer(base_path)
        self.row_scores: dict[int, ValidationScores] = {}  # each finished trial's, by trial number

    def run(self) -> Winner | None:
        """The winning settings; None when the split leaves nothing to score or to train on."""
        if not self.split.held or not self.split.new:
            LOG.warning("no hyperparameter search: too few training rows to hold %.0f%% out",
                        100 * self.hpo.validation_share)
            return None
        started = time.perf_counter()
        self._enqueue_opening()
        reports: list[TrialReport] = []
        key: int | None = None  # the step this search reports at (below)
        for k in range(1, self.hpo.trials + 1):
            trial = self.study.ask()
            # Intermediate values are reported at a step of this search's own, so the pruner
            # compares a trial only with this search's trials: another window's validation
            # accuracy is no yardstick for this one's.
            key = trial.number if key is None else key
            reports.append(self._trial(trial, k, key))
            LOG.info("trial %d/%d: %s", k, self.hpo.trials, reports[-1])
        # The first two trials are never pruned; a trial whose loss diverged has no finite score.
        finished = [t for t in reports if not t.pruned and t.value is not None and math.isfinite(t.value)]
        if not finished:
            LOG.warning("no trial of the search finished with a finite score: training with the settings as they are")
            return None
        best, p_value = self._winner(finished)
        self.study.set_user_attr(WINNER, best.params)
        reports = [t.model_copy(update={"winner": t is best}) for t in reports]
        start_dir = self._fresh_adapter(best.params, "winner") if reshaped(best.params) else None
        return Winner(trial_settings(self.cfg, best.params), start_dir, SearchReport(
            metric="label_probability" if any(r.label for r in self.split.held) else "-answer_loss",
            validation_rows=len(self.split.held), trials=reports, winner=best.params, opening_p_value=p_value,
            seconds=time.perf_counter() - started))

    def _winner(self, finished: list[TrialReport]) -> tuple[TrialReport, float | None]:
        """The best-scoring trial, unless the opening one finished and the best beats it by less than
        `hpo.replace_p` allows (row by row, corrected for the challengers tried); the p-value."""
        best = max(finished, key=lambda t: (t.value, -t.loss))
        opening = next((t for t in finished if t.enqueued), None)
        if opening is None or best is opening:
            return best, None
        test = paired_increase(self.row_scores[opening.number].rows, self.row_scores[best.number].rows)
        p_value = min(1.0, test.p_value * (len(finished) - 1))
        if p_value <= self.hpo.replace_p:
            return best, p_value
        LOG.info("trial %d scored best (%.3f against %.3f) but not beyond noise (p = %.3f): the opening "
                 "trial %d wins", best.number, best.value, opening.value, p_value, opening.number)
        return opening, p_value

    def _enqueue_opening(self) -> None:
        """The previous update's winner is tried first, and before there is one the settings as
        configured: a search then trades them only for settings that validate better. Without
        that opening, a first search of four trials never tried the fixed default and trained an
        MCID window with worse settings than it (0.71 against 0.85 on its test tickets)."""
        opening = within(self.study.user_attrs.get(WINNER) or self._configured(), self.hpo, self.shape_searched)
        waiting = self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        if opening and not waiting:  # one left waiting by a search killed before it ran is tried first anyway
            self.study.enqueue_trial(opening, user_attrs={"enqueued": True})

    def _configured(self) -> dict[str, float]:
        cfg = self.cfg
        params = {"learning_rate": cfg.learning_rate, "epochs": cfg.epochs, "rank": cfg.adapter.rank,
                  "alpha_ratio": cfg.adapter.alpha / cfg.adapter.rank}
        if cfg.replay_ratio != "balanced":
            params["replay_share"] = cfg.replay_ratio
        return params

    def _fresh_adapter(self, params: dict[str, float], name: str) -> Path:
        directory = self.scratch / f"fresh-{name}"
        initial_adapter(self.base_path, directory, trial_settings(self.cfg, params).adapter, self.cfg.seed,
                        self.placement)
        return directory

    def _scores(self, model: nn.Module, cfg: TrainSettings) -> ValidationScores:
        return validation_scores(model, self.tokenizer, self.split.held, self.snapshot.labels, cfg, self.votes,
                                 self.vote_weight)

    def _trial(self, trial: optuna.Trial, k: int, key: int) -> TrialReport:
        params = suggest(trial, self.hpo, self.shape_searched, bool(self.split.replay))
        cfg = trial_settings(self.cfg, params)
        out = self.scratch / f"trial-{trial.number}"
        start = self._fresh_adapter(params, str(trial.number)) if reshaped(params) else self.live_dir
        steps, started = 0, time.perf_counter()
        halfway: float | None = None  # the score it reported half-way

        def progress(p: Progress) -> None:
            nonlocal steps
            steps = p.step
            if self.on_progress is not None:
                self.on_progress(p.model_copy(update={"trial": k, "trials": self.hpo.trials}))

        def midway(model: nn.Module) -> None:
            nonlocal halfway
            value = self._scores(model, cfg).value
            trial.report(value, step=key)
            halfway = value
            if self.hpo.pruning and trial.should_prune():
                raise optuna.TrialPruned(f"validation score {value:.3f} half-way")

        def report(value: float | None, loss: float, pruned: bool) -> TrialReport:
            return TrialReport(number=trial.number, params=params, value=value, loss=loss, steps=steps,
                               seconds=time.perf_counter() - started, pruned=pruned,
                               enqueued=bool(trial.user_attrs.get("enqueued")))

        try:
            model, _, _ = train_adapter(self.split.new, self.split.replay, self.base_path, start, out, cfg,
                                        progress, self.cancel, midway, self.placement)
            scores = self._scores(model, cfg)
        except optuna.TrialPruned:
            self.study.tell(trial, state=TrialState.PRUNED)
            return report(halfway, float("nan"), pruned=True)
        except Diverged:  # its settings learned nothing: a failed trial, not a failed search
            self.study.tell(trial, state=TrialState.FAIL)
            return report(None, float("nan"), pruned=False)
        except BaseException:
            self.study.tell(trial, state=TrialState.FAIL)
            raise
        finally:
            shutil.rmtree(out, ignore_errors=True)
            if start != self.live_dir:
                shutil.rmtree(start, ignore_errors=True)
        self.row_scores[trial.number] = scores
        self.study.tell(trial, scores.value)
        return report(scores.value, scores.loss, pruned=False)
