"""A search prunes a trial whose half-way score is below the median of its own search's trials,
and never compares one window's validation scores with another's; a window of replies alone is
scored by its answer loss.

Real training of the tiny llama; only the validation scores are scripted, so which trial is
hopeless is known in advance.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from learners import hpo
from learners.base_model import load_base
from learners.gate import score_probes
from learners.hpo import Search
from learners.hpo_config import HpoSettings, PositiveRange
from learners.scoring import LabelScorer
from learners.update_step import initial_adapter
from learners.validation import validation_score
from replay.buffer import Snapshot
from streams.records import TicketRecord
from tests.conftest import TINY_TRAIN

LABELS = ("card_arrival", "exchange_rate")
SETTINGS = HpoSettings(trials=3, epochs=PositiveRange(low=2.0, high=3.0), rank=None, alpha_ratio=None)


def scripted(monkeypatch: pytest.MonkeyPatch, scores: list[float]) -> None:
    """Validation scores in the order the search asks for them: half-way, then at the end, per trial."""
    monkeypatch.setattr(hpo, "validation_score", lambda *args: (scores.pop(0), 1.0))


def test_a_hopeless_trial_is_pruned_half_way_against_its_own_search_only(
        tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    live = tmp_path / "live"
    initial_adapter(tiny_llama, live, TINY_TRAIN.adapter, seed=0)
    rows = [TicketRecord(id=f"t{i}", text=f"my {'card' if i % 2 else 'rate'} issue {i}", label=LABELS[i % 2])
            for i in range(24)]
    snapshot = Snapshot(new_windows=(1,), new=rows, replay=[], probes={}, labels=LABELS)
    journal = tmp_path / "study.journal"

    def search() -> Search:
        return Search(snapshot, tiny_llama, live, False, TINY_TRAIN, SETTINGS, journal, tmp_path / "scratch")

    scripted(monkeypatch, [0.9, 0.9, 0.8, 0.8, 0.1])
    first = search().run()
    assert first is not None
    trials = first.report.trials
    assert [t.pruned for t in trials] == [False, False, True]
    assert trials[2].value == 0.1 and 0 < trials[2].steps < trials[0].steps  # stopped half-way
    assert trials[0].winner and first.report.winner == trials[0].params

    # A later window scores lower all round: judged against the earlier search's trials, each of
    # its trials would be pruned; against its own, none is.
    scripted(monkeypatch, [0.2, 0.2, 0.3, 0.3, 0.25, 0.25])
    second = search().run()
    assert second is not None
    assert [t.pruned for t in second.report.trials] == [False, False, False]
    assert second.report.trials[0].enqueued and second.report.trials[0].params == trials[0].params


def test_a_window_of_replies_alone_is_scored_by_its_answer_loss(tiny_llama: Path) -> None:
    model, tokenizer = load_base(tiny_llama)
    replies = [TicketRecord(id=f"r{i}", text=f"where is my card {i}", reply="It ships today.") for i in range(3)]
    score, loss = validation_score(model, tokenizer, replies, LABELS, TINY_TRAIN)
    assert loss > 0 and score == -loss  # higher is better, as with accuracy
    labelled = [r.model_copy(update={"label": LABELS[0]}) for r in replies]
    score, with_labels = validation_score(model, tokenizer, labelled, LABELS, TINY_TRAIN)
    # The mean probability of each row's label among all labels, as the gate scores it: not accuracy's steps.
    scores = score_probes(model, LabelScorer(tokenizer, LABELS), {0: labelled})[0].scores
    given = torch.softmax(scores, dim=1)[:, LABELS.index(LABELS[0])]
    assert score == pytest.approx(float(given.mean()), rel=1e-5) and 0 < score < 1 and with_labels > 0
