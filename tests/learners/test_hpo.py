"""A search prunes a trial whose half-way score is below the median of its own search's trials,
and never compares one window's validation scores with another's; a challenger replaces the
opening trial only when it beats it beyond noise, row by row; a window of replies alone is scored
by its answer loss.

Real training of the tiny llama; only the validation scores are scripted, so which trial is
hopeless is known in advance.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from learners import hpo
from learners.base_model import load_base
from learners.gate import score_probes
from learners.hpo import Search
from learners.hpo_config import HpoSettings, PositiveRange
from learners.prompts import ticket_examples
from learners.scoring import LabelScorer
from learners.train import answer_loss, collate
from learners.update_step import initial_adapter
from learners.validation import ValidationScores, answer_losses, validation_scores
from replay.buffer import Snapshot
from streams.records import TicketRecord
from tests.conftest import TINY_TRAIN

LABELS = ("card_arrival", "exchange_rate")
SETTINGS = HpoSettings(trials=3, epochs=PositiveRange(low=2.0, high=3.0), rank=None, alpha_ratio=None)


def scripted(monkeypatch: pytest.MonkeyPatch, scores: list[float | list[float]]) -> None:
    """Validation scores in the order the search asks for them: half-way, then at the end, per trial;
    a number is every held-out row's score, a list each row's."""
    def score(model: object, tokenizer: object, held: list[TicketRecord], *args: object) -> ValidationScores:
        value = scores.pop(0)
        return ValidationScores(value if isinstance(value, list) else [value] * len(held), 1.0)

    monkeypatch.setattr(hpo, "validation_scores", score)


def searcher(tiny_llama: Path, tmp_path: Path, tickets: int, settings: HpoSettings = SETTINGS) -> Callable[[], Search]:
    """A new search of one window of `tickets` rows of two labels each time it is called, all of
    them in one study."""
    live = tmp_path / "live"
    initial_adapter(tiny_llama, live, TINY_TRAIN.adapter, seed=0)
    rows = [TicketRecord(id=f"t{i}", text=f"my {'card' if i % 2 else 'rate'} issue {i}", label=LABELS[i % 2])
            for i in range(tickets)]
    snapshot = Snapshot(new_windows=(1,), new=rows, replay=[], probes={}, labels=LABELS)
    return lambda: Search(snapshot, tiny_llama, live, False, TINY_TRAIN, settings, tmp_path / "study.journal",
                          tmp_path / "scratch")


def test_a_hopeless_trial_is_pruned_half_way_against_its_own_search_only(
        tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    search = searcher(tiny_llama, tmp_path, 24)
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


def test_a_challenger_replaces_the_opening_trial_only_beyond_noise(
        tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    quick = SETTINGS.model_copy(update={"epochs": PositiveRange(low=0.5, high=0.75)})  # 2-3 steps a trial
    search = searcher(tiny_llama, tmp_path, 40, quick)  # 8 rows held out
    # The best mean (0.525 against 0.5), from rows that go either way: luck, not a better setting.
    scripted(monkeypatch, [0.5, 0.5, 0.5, [0.95, 0.1] * 4, 0.5, 0.4])
    first = search().run()
    assert first is not None
    opening, lucky, _ = first.report.trials
    assert opening.enqueued and lucky.value is not None and opening.value is not None and lucky.value > opening.value
    assert opening.winner and first.report.winner == opening.params
    assert first.report.opening_p_value is not None and first.report.opening_p_value > SETTINGS.replace_p

    # Better on every one of the 8 rows: p = 2 ** -8, times the two challengers.
    scripted(monkeypatch, [0.5, 0.5, 0.7, 0.7, 0.7, 0.4])  # the third is not pruned
    second = search().run()
    assert second is not None
    opening, better, _ = second.report.trials
    assert opening.params == first.report.winner and better.winner and second.report.winner == better.params
    assert second.report.opening_p_value == pytest.approx(2 * 2 ** -8)


def test_a_window_of_replies_alone_is_scored_by_its_answer_loss(tiny_llama: Path) -> None:
    model, tokenizer = load_base(tiny_llama)
    replies = [TicketRecord(id=f"r{i}", text=f"where is my card {i}", reply="It ships today.") for i in range(3)]
    alone = validation_scores(model, tokenizer, replies, LABELS, TINY_TRAIN)
    assert alone.loss > 0 and alone.value == pytest.approx(-alone.loss)  # higher is better, as with accuracy
    assert len(alone.rows) == 3 and len(set(alone.rows)) > 1  # row by row, for the paired test
    labelled = [r.model_copy(update={"label": LABELS[0]}) for r in replies]
    with_labels = validation_scores(model, tokenizer, labelled, LABELS, TINY_TRAIN)
    # The probability of each row's label among all labels, as the gate scores it: not accuracy's steps.
    scores = score_probes(model, LabelScorer(tokenizer, LABELS), {0: labelled})[0].scores
    given = torch.softmax(scores, dim=1)[:, LABELS.index(LABELS[0])]
    assert with_labels.rows == pytest.approx(given.tolist(), rel=1e-5)
    assert 0 < with_labels.value < 1 and with_labels.loss > 0


def test_held_out_rows_are_scored_as_served_with_the_buffers_vote(tiny_llama: Path) -> None:
    model, tokenizer = load_base(tiny_llama)
    rows = [TicketRecord(id=f"r{i}", text="where is my card " + "please " * 3 * i, label=LABELS[0],
                         reply="It ships today." * (i + 1)) for i in range(3)]
    votes = {"r0": {LABELS[1]: 1.0}, "r1": {LABELS[0]: 0.9, LABELS[1]: 0.1}}  # none on r2
    alone = validation_scores(model, tokenizer, rows, LABELS, TINY_TRAIN)
    served = validation_scores(model, tokenizer, rows, LABELS, TINY_TRAIN, votes, vote_weight=2.0)
    assert served.rows[0] < alone.rows[0] and served.rows[1] > alone.rows[1]  # the vote against, for
    assert served.rows[2] == pytest.approx(alone.rows[2], rel=1e-5) and served.loss == alone.loss

    # Each row's loss is computed in batches, the same as row by row; a bare ticket has none.
    bare = TicketRecord(id="bare", text="hello")
    one_by_one = [float(answer_loss(model, collate(ticket_examples(tokenizer, [r], TINY_TRAIN.max_length,
                                                                   TINY_TRAIN.system_prompt), tokenizer.pad_token_id)))
                  for r in rows]
    assert answer_losses(model, tokenizer, [rows[0], bare, *rows[1:]], TINY_TRAIN) == pytest.approx(one_by_one,
                                                                                                   rel=1e-4)
