"""The search's settings refuse ranges that make no sense, naming the field, when they load;
its validation split is stratified and leaves every label something to learn from."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from pydantic import ValidationError

from learners.hpo import suggest, trial_settings, within
from learners.hpo_config import HpoSettings, ShareRange
from learners.validation import ValidationSplit
from service.settings import CONFIG_FILE_ENV, Settings
from streams.records import TicketRecord
from tests.conftest import TINY_TRAIN


@pytest.mark.parametrize(("hpo", "field", "message"), [
    ({"learning_rate": {"low": 1e-2, "high": 1e-3}}, "hpo.learning_rate", "`low` 0.01 is above `high` 0.001"),
    ({"learning_rate": {"low": -1e-3, "high": 1e-3}}, "hpo.learning_rate", "`low` must be above 0"),
    ({"epochs": {"low": 0, "high": 2}}, "hpo.epochs", "`low` must be above 0"),
    ({"replay_share": {"low": 0.2, "high": 1.0}}, "hpo.replay_share", "below 1"),
    ({"rank": [8, 0]}, "hpo.rank", "every rank must be above 0"),
    ({"lerning_rate": {"low": 1e-4, "high": 1e-3}}, "hpo.lerning_rate", "Extra inputs are not permitted"),
    ({"epochs": {"low": 1, "high": 2, "step": 1}}, "hpo.epochs.step", "Extra inputs are not permitted"),
    ({"validation_share": 1.0}, "hpo.validation_share", "less than 1"),
])
def test_senseless_ranges_are_refused_when_the_settings_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             hpo: dict[str, object], field: str,
                                                             message: str) -> None:
    with pytest.raises(ValidationError) as refused:
        Settings(hpo=hpo)  # type: ignore[arg-type]
    assert field in str(refused.value) and message in str(refused.value)
    # The same from the config file a team edits.
    config = tmp_path / "evergreen.toml"
    config.write_text("[hpo]\ntrials = 4\n[hpo.learning_rate]\nlow = 0.01\nhigh = 0.001\n")
    monkeypatch.setenv(CONFIG_FILE_ENV, str(config))
    with pytest.raises(ValidationError, match=r"hpo\.learning_rate\n.*`low` 0.01 is above `high` 0.001"):
        Settings()


def test_no_search_by_default_and_a_trial_keeps_its_settings_valid() -> None:
    assert not HpoSettings().searching and not HpoSettings(trials=1).searching and HpoSettings(trials=2).searching
    cfg = trial_settings(TINY_TRAIN, {"learning_rate": 1e-4, "epochs": 1.0, "replay_share": 0.5, "rank": 4,
                                      "alpha_ratio": 2.0})
    assert (cfg.learning_rate, cfg.epochs, cfg.replay_ratio) == (1e-4, 1.0, 0.5)
    assert (cfg.adapter.rank, cfg.adapter.alpha) == (4, 8)
    assert cfg.min_new_epochs == 1.0  # lowered to the trial's epochs, which the settings require
    # A winner found under other ranges is retried only within today's; rank only where it may change.
    old = {"learning_rate": 1.0, "epochs": 2.0, "rank": 32, "alpha_ratio": 2.0}
    assert within(old, HpoSettings(), shape_searched=False) == {"epochs": 2.0}
    assert within(old, HpoSettings(), shape_searched=True) == {"epochs": 2.0, "rank": 32, "alpha_ratio": 2.0}


def test_the_replay_share_is_searched_only_when_asked() -> None:
    # The earlier windows' held-out rows are rows the live version trained on: a weak test of
    # forgetting, so by default a search leaves the replay share to `train.replay_ratio`.
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    assert suggest(study.ask(), HpoSettings(), shape_searched=False, replaying=True).keys() == {
        "learning_rate", "epochs"}
    asked = HpoSettings(replay_share=ShareRange(low=0.2, high=0.6))
    share = suggest(study.ask(), asked, shape_searched=False, replaying=True)["replay_share"]
    assert 0.2 <= share <= 0.6
    assert "replay_share" not in suggest(study.ask(), asked, shape_searched=False, replaying=False)


def test_the_validation_split_is_stratified_over_new_and_replay_rows() -> None:
    new = [TicketRecord(id=f"n{i}", text="t", label="ab"[i % 2]) for i in range(20)]
    replay = [TicketRecord(id=f"r{i}", text="t", label="c" if i else "d") for i in range(10)]
    split = ValidationSplit.of(new, replay, 0.2, seed=0)
    held = sorted(r.label or "" for r in split.held)
    assert held == ["a", "a", "b", "b", "c"]  # d has one row: kept for training
    assert {r.id for r in split.held}.isdisjoint(r.id for r in [*split.new, *split.replay])
    assert len(split.new) + len(split.replay) + len(split.held) == 30
