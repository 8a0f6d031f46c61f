"""The gate rejects forgetting and poisoned updates, and lets healthy ones through.

Unit checks of the decision rules on hand-made scores, then real updates of the tiny llama
over ten seeds: poisoned candidates (shuffled labels; a large learning rate with no replay and
no EWC) must be rejected every time, healthy ones accepted at least nine times in ten.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from conftest import TINY_TRAIN
from learners.config import GateSettings, TrainSettings
from learners.gate import Canary, WindowScore, judge
from learners.update import initial_adapter, train_candidate
from replay.buffer import Snapshot
from streams.records import TicketRecord

POLICY = GateSettings(max_canary_increase=None)


def score(correct: list[bool], majority_rate: float = 0.5) -> WindowScore:
    return WindowScore(sum(correct) / len(correct), 0.0, len(correct), tuple(correct), majority_rate)


def test_a_significant_drop_is_rejected_and_a_noisy_one_is_not() -> None:
    live = {1: score([True] * 20), 2: score([False] * 20)}
    forgot = {1: score([True] * 10 + [False] * 10), 2: score([True] * 20)}
    report = judge(forgot, live, [2], POLICY)
    assert not report.passed and report.reason.startswith("drop on window 1")
    assert report.checks[0].p_value is not None and report.checks[0].p_value < 0.001
    noisy = {1: score([True] * 19 + [False]), 2: score([True] * 20)}  # one probe: not significant
    assert judge(noisy, live, [2], POLICY).passed


def test_new_windows_must_be_learned_beyond_their_label_prior() -> None:
    live = {1: score([False] * 20)}
    guessing = {1: score([True] * 11 + [False] * 9, majority_rate=0.5)}
    report = judge(guessing, live, [1], POLICY)
    assert not report.passed and "label prior" in report.reason
    assert judge({1: score([True] * 18 + [False] * 2)}, live, [1], POLICY).passed


def test_canary_drift_over_the_bound_is_rejected() -> None:
    live, candidate = {1: score([False] * 20)}, {1: score([True] * 20)}
    policy = GateSettings(max_canary_increase=0.1)
    assert judge(candidate, live, [1], policy, canary=Canary(3.05, 3.0, 3.0)).passed
    report = judge(candidate, live, [1], policy, canary=Canary(3.5, 3.0, 3.0))
    assert not report.passed and report.reason.startswith("canary")
    assert report.to_json()["canary"]["drift"] == pytest.approx(0.5)


WORDS = ["card", "rate", "topup", "stolen", "refund", "pin", "atm", "fee", "transfer", "cash"]


def window(seed: int, labels: list[str], keywords: dict[str, str], n: int, tag: str) -> list[TicketRecord]:
    rng = random.Random(f"{seed}-{tag}")
    return [TicketRecord(id=f"{tag}-{i}", label=labels[i % len(labels)],
                         text=f"{rng.choice(['hello', 'hi', 'please', 'help'])} my "
                              f"{keywords[labels[i % len(labels)]]} issue {rng.randint(0, 99)}")
            for i in range(n)]


def run_seed(seed: int, base: Path, out: Path) -> dict[str, bool]:
    """Learn window 1, then gate three candidates for window 2; returns each one's verdict."""
    rng = random.Random(seed)
    keywords = dict(zip([f"intent_{i}" for i in range(6)], rng.sample(WORDS, 6), strict=True))
    first, second = list(keywords)[:3], list(keywords)[3:]
    train = TINY_TRAIN.model_copy(update={"seed": seed})
    w1, p1 = window(seed, first, keywords, 18, "w1"), window(seed, first, keywords, 12, "p1")
    w2, p2 = window(seed, second, keywords, 18, "w2"), window(seed, second, keywords, 12, "p2")
    initial_adapter(base, out / "v0", train.adapter, seed)
    learned = train_candidate(Snapshot((1,), w1, [], {1: p1}, tuple(first)), base,
                              out / "v0", out / "v1", train, POLICY)
    assert learned.gate.passed, learned.gate.reason

    def candidate(name: str, rows: list[TicketRecord], replay: list[TicketRecord], cfg: TrainSettings) -> bool:
        snapshot = Snapshot((2,), rows, replay, {1: p1, 2: p2}, tuple(first + second))
        return train_candidate(snapshot, base, out / "v1", out / name, cfg, POLICY).gate.passed

    labels = [r.label for r in w2]
    random.Random(seed).shuffle(labels)
    shuffled = [r.model_copy(update={"label": label}) for r, label in zip(w2, labels, strict=True)]
    reckless = train.model_copy(update={"learning_rate": 3e-2, "replay_ratio": 0.0,
                                        "ewc": train.ewc.model_copy(update={"enabled": False})})
    return {"shuffled labels": candidate("shuffled", shuffled, w1, train),
            "large lr, no replay, no EWC": candidate("reckless", w2, [], reckless),
            "healthy": candidate("healthy", w2, w1, train)}


def test_poisoned_updates_are_rejected_and_healthy_ones_accepted(tiny_llama: Path, tmp_path: Path) -> None:
    verdicts = [run_seed(seed, tiny_llama, tmp_path / str(seed)) for seed in range(10)]
    accepted = {kind: sum(v[kind] for v in verdicts) for kind in verdicts[0]}
    assert accepted["shuffled labels"] == 0, accepted
    assert accepted["large lr, no replay, no EWC"] == 0, accepted
    assert accepted["healthy"] >= 9, accepted
