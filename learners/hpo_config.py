"""Settings of the hyperparameter search inside each update (`learners.hpo`)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Range(BaseModel):
    """A closed interval a parameter is searched in."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    low: float = Field(description="Smallest value tried.")
    high: float = Field(description="Largest value tried.")

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if self.low > self.high:
            raise ValueError(f"`low` {self.low} is above `high` {self.high}")
        return self

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high


class PositiveRange(Range):
    """A range of a quantity that must stay above zero (a rate, a number of passes)."""

    @model_validator(mode="after")
    def _positive(self) -> PositiveRange:
        if self.low <= 0:
            raise ValueError(f"`low` must be above 0, not {self.low}")
        return self


class ShareRange(Range):
    """A range of a share of each batch: at least 0, below 1."""

    @model_validator(mode="after")
    def _share(self) -> ShareRange:
        if self.low < 0 or self.high >= 1:
            raise ValueError(f"a share must be at least 0 and below 1, not {self.low} to {self.high}")
        return self


class HpoSettings(BaseModel):
    """A search, inside each update, for the training settings that learn its window best.

    Each trial trains from the live version as an update would, on the training rows less a
    validation split, and is scored on that split, never on the gate's probes; the winner's
    settings then train the candidate on every training row, and only it meets the gate. One
    Optuna study (a journal file) remembers every trial over the service's life. A range left
    unset is not searched: the parameter keeps its `train` setting.
    """

    model_config = ConfigDict(extra="forbid")

    trials: int = Field(0, ge=0, description="Trials per update (0 or 1: no search; the update trains with the "
                                             "`train` settings as they are). Each costs about one update's "
                                             "training.")
    learning_rate: PositiveRange | None = Field(
        PositiveRange(low=3e-4, high=3e-3), description="Peak learning rates tried, on a log scale.")
    epochs: PositiveRange | None = Field(
        PositiveRange(low=1.5, high=4.0), description="Passes over the new rows tried (`train.epochs`); "
                                                      "`train.min_new_epochs` is lowered to a trial's epochs.")
    rank: list[int] | None = Field(
        [8, 16, 32], min_length=1, description="LoRA ranks tried. Searched only while the live version is the "
                                               "untrained first one: a trained adapter's rank is its shape, "
                                               "which a warm start keeps.")
    alpha_ratio: PositiveRange | None = Field(
        PositiveRange(low=1.0, high=4.0), description="LoRA alpha tried, as a multiple of the rank. Searched "
                                                      "with the rank only: on a trained adapter a new alpha "
                                                      "would rescale what it learned.")
    replay_share: ShareRange | None = Field(
        None, description="Shares of each batch drawn from replay tried (`train.replay_ratio`; the "
                          "`min_new_epochs` cap still applies). Unset by default: a trial's score on the "
                          "earlier windows is measured on replay rows the live version has trained on, a weak "
                          "test of forgetting, and a search of it on MCID picked less replay that cost the "
                          "earlier windows 6-11 points of their test tickets.")
    validation_share: float = Field(
        0.2, gt=0, lt=1, description="Share of the training rows, of the new window and of the replay sample "
                                     "alike, held out to score the trials (stratified by label; a label keeps at "
                                     "least one training row). The gate's probes are never among them.")
    replace_p: float = Field(
        0.05, gt=0, le=1, description="A challenger replaces the opening trial (the last winner, or the settings "
                                      "as configured) only when it beats it row by row on the validation split at "
                                      "this p-value (a one-sided paired permutation test, times the number of "
                                      "challengers that finished); 1: the best score wins. The best of several "
                                      "trials on a few dozen rows is partly luck, and on MCID taking it cost 7-12 "
                                      "test tickets against the default.")
    startup_trials: int = Field(2, ge=0, description="Trials of the study sampled at random before TPE models "
                                                     "the results (few: an update runs few trials).")
    pruning: bool = Field(True, description="Stop a trial half-way when its validation score then is below the "
                                            "median of the same update's trials at that point.")
    journal: Path | None = Field(None, description="Optuna journal file of the study (unset: `hpo-study.journal` "
                                                   "in `data_dir`).")

    @field_validator("rank")
    @classmethod
    def _positive_ranks(cls, ranks: list[int] | None) -> list[int] | None:
        if ranks is not None and min(ranks) <= 0:
            raise ValueError(f"every rank must be above 0, not {ranks}")
        return ranks

    @property
    def searching(self) -> bool:
        return self.trials >= 2
