"""The hyperparameter search runs inside an update's training process: its trials reach the
update record and the API, the winner's settings train the candidate, and one study in the data
directory carries over from update to update, and survives a kill -9 of the training process.

Real parts: `python -m learners.worker` children, the tiny llama with LoRA, Optuna's journal file.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from prometheus_client import generate_latest
from rich.progress import Progress, TextColumn

from learners.config import PROMOTE_ALL
from learners.hpo import STUDY_NAME
from learners.hpo_config import HpoSettings, PositiveRange, ShareRange
from learners.update_step import TRAIN_CONFIG_FILE
from learners.validation import ValidationSplit
from replay.buffer import ReplayBuffer
from replay.embed import SentenceEmbedder
from service.buffer_votes import held_out_votes
from service.cli import _show
from service.core import Service
from service.narrator import Narrator
from service.routes.updates import UpdatePublic
from service.update_manager import STUDY_JOURNAL
from streams.records import TicketRecord
from tests.conftest import TINY_TRAIN, gauge, tiny_settings, wait_for
from tests.service.test_update_manager import LABELS, add_window, run_update

# Short trials: the tiny llama, a few steps each.
HPO = HpoSettings(trials=3, epochs=PositiveRange(low=1.0, high=2.0), rank=[4, 8],
                  replay_share=ShareRange(low=0.1, high=0.8))
TRAIN = TINY_TRAIN.model_copy(update={"threads": 1})


def study(data_dir: Path) -> optuna.Study:
    storage = JournalStorage(JournalFileBackend(str(data_dir / STUDY_JOURNAL)))
    return optuna.load_study(study_name=STUDY_NAME, storage=storage)


def trained_with(service: Service, version: str | None) -> dict[str, Any]:
    """The settings a registry version was trained with."""
    return json.loads((service.registry.path(version or "") / TRAIN_CONFIG_FILE).read_text())


def test_each_update_searches_and_the_winner_trains_the_candidate(tiny_llama: Path, tmp_path: Path) -> None:
    service = Service(tiny_settings(tmp_path, None, train=TRAIN, gate=PROMOTE_ALL, hpo=HPO))
    try:
        add_window(service)
        first = run_update(service, "the first update's search")
        assert first.status == "promoted" and first.search is not None, first
        search = first.search
        assert [t.number for t in search.trials] == [0, 1, 2]
        assert all(t.steps > 0 and t.seconds > 0 and t.value is not None for t in search.trials)
        # The study's first search opens with the settings as configured, where the ranges hold them
        # (the tiny model's 30 epochs and rank 16 are outside this search's, so those are drawn).
        assert [t.enqueued for t in search.trials] == [True, False, False]
        assert search.trials[0].params["learning_rate"] == TRAIN.learning_rate
        assert search.trials[0].params["epochs"] != TRAIN.epochs
        # The first version is untrained: its rank may change, so it is searched; nothing to replay yet.
        assert all({"learning_rate", "epochs", "rank", "alpha_ratio"} == set(t.params) for t in search.trials)
        winner = next(t for t in search.trials if t.winner)
        assert winner.params == search.winner and not winner.pruned
        trained = trained_with(service, first.version)
        assert trained["learning_rate"] == winner.params["learning_rate"]
        assert trained["epochs"] == winner.params["epochs"]
        assert trained["adapter"]["rank"] == winner.params["rank"]
        assert trained["adapter"]["alpha"] == round(winner.params["alpha_ratio"] * winner.params["rank"])
        shape = json.loads((service.registry.path(first.version or "") / "adapter_config.json").read_text())
        assert (shape["r"], shape["lora_alpha"]) == (trained["adapter"]["rank"], trained["adapter"]["alpha"])
        # Served as the API serves it.
        public = UpdatePublic.model_validate(json.loads(UpdatePublic(**vars(first)).model_dump_json()))
        assert public.search == search
        journal = tmp_path / STUDY_JOURNAL
        size = journal.stat().st_size

        service.buffer.add_many([TicketRecord(id=f"u{i}", text=f"the {'card' if i % 2 else 'rate'} again {i}",
                                              label=LABELS[i % 2]) for i in range(40)])
        second = run_update(service, "the second update's search")
        assert second.status == "promoted" and second.search is not None, second
        opening = second.search.trials[0]
        assert opening.enqueued and opening.number == 3
        # The live version is trained now: the rank stays, and what may change is retried.
        assert set(opening.params) == {"learning_rate", "epochs", "replay_share"}
        assert (opening.params["learning_rate"], opening.params["epochs"]) == (trained["learning_rate"],
                                                                               trained["epochs"])
        assert trained_with(service, second.version)["replay_ratio"] == second.search.winner["replay_share"]
        assert journal.stat().st_size > size
        assert len(study(tmp_path).trials) == 6
    finally:
        service.stop()


def test_trials_are_scored_on_training_rows_never_on_the_gates_probes(tiny_llama: Path, tmp_path: Path) -> None:
    service = Service(tiny_settings(tmp_path, None, train=TRAIN, gate=PROMOTE_ALL))
    try:
        add_window(service, 80)
        service.buffer.close_window()
        snapshot = service.buffer.snapshot([], seed=0)
        split = ValidationSplit.of(snapshot.new, snapshot.replay, HPO.validation_share, seed=0)
        probes = {r.id for rows in snapshot.probes.values() for r in rows}
        assert probes and split.held
        assert {r.id for r in split.held} <= {r.id for r in snapshot.new}
        assert {r.id for r in split.held}.isdisjoint(probes)
        assert {r.label for r in split.held} == set(LABELS)
    finally:
        service.stop()


def test_a_search_killed_mid_trial_leaves_a_study_the_next_update_goes_on_from(tiny_llama: Path,
                                                                               tmp_path: Path) -> None:
    long = HPO.model_copy(update={"epochs": PositiveRange(low=40.0, high=60.0)})  # trials of seconds
    service = Service(tiny_settings(tmp_path, None, train=TRAIN, gate=PROMOTE_ALL, hpo=long))
    try:
        add_window(service)
        killed = service.updates.start("manual")
        wait_for(lambda: killed.progress is not None and killed.progress.trial == 2, 120, "the second trial")
        assert killed.stage == "searching" and killed.progress is not None and killed.progress.trials == 3
        assert gauge(generate_latest(service.metrics_registry).decode(), "evergreen_update_trials") == 3
        lines: list[str] = []
        Narrator(service, lines.append).tick()  # what `evergreen up` tells on the terminal
        assert lines[-1].endswith("update 1 searches window 1: 3 trials of its training settings"), lines
        worker = service.updates.worker_pid
        assert worker is not None
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: killed.finished_at is not None, 30, "the update to notice")
        assert killed.status == "failed"
        states = [t.state for t in study(tmp_path).trials]
        assert states == [TrialState.COMPLETE, TrialState.RUNNING]  # the killed trial stays as it was

        service.updates.hpo = HPO
        again = run_update(service, "the update after the kill")
        assert again.status == "promoted" and again.search is not None, again
        assert [t.number for t in again.search.trials] == [2, 3, 4]
    finally:
        service.stop()


def test_the_progress_bar_says_which_trial_is_training() -> None:
    bar = Progress(TextColumn("{task.description}"))
    task = bar.add_task("preparing", total=None, id=1, loss="-", speed="-", eta="-")
    progress = {"step": 3, "steps": 9, "loss": 1.5, "tokens_per_s": 800.0, "eta_s": 4.0, "trial": 2, "trials": 3}
    _show(bar, task, {"stage": "searching", "progress": progress}, cancelling=False)
    assert bar.tasks[0].description == "searching: trial 2/3" and bar.tasks[0].completed == 3


def test_a_held_out_row_gets_the_vote_of_every_stored_ticket_but_its_own(tmp_path: Path,
                                                                         embedder: SentenceEmbedder) -> None:
    """Trials are scored as `/v1/classify` would answer a new ticket like the held-out row: its own
    stored copy, the nearest of all, must not vote for its label."""
    buffer = ReplayBuffer(tmp_path, embedder)
    cards = [TicketRecord(id=f"c{i}", text=text, label="card_arrival") for i, text in enumerate(
        ["my new card has not arrived yet", "when will my card be delivered", "card still not in the post"])]
    odd = TicketRecord(id="odd", text="my new card has still not arrived", label="exchange_rate")  # mislabelled
    buffer.add_many([*cards, odd])
    votes = held_out_votes(buffer, [odd, cards[0], TicketRecord(id="x", text="no label")],
                           ["card_arrival", "exchange_rate"])
    assert set(votes) == {"odd", "c0"}
    assert votes["odd"] == {"card_arrival": pytest.approx(1.0)}  # its own copy would have voted exchange_rate
    [near] = buffer.advise([odd.text], ["card_arrival", "exchange_rate"], 0, 0)
    assert near.votes["exchange_rate"] > 0.2
