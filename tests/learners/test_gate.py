"""The gate rejects forgetting and poisoned updates, and lets healthy ones through.

Unit checks of the decision rules on hand-made scores, then real updates of the tiny llama
over ten seeds: poisoned candidates (shuffled labels; a large learning rate with no replay and
no EWC) must be rejected every time, healthy ones accepted at least nine times in ten.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from learners.base_model import load_base
from learners.config import GateSettings, TrainSettings
from learners.gate import ProbeMatrix, evaluate, finite_scores, judge, score_probes, window_score
from learners.reports import Canary, WindowScore
from learners.scoring import LabelScorer
from learners.update_step import initial_adapter, train_candidate
from replay.buffer import Snapshot
from streams.records import TicketRecord
from tests.conftest import TINY_TRAIN

POLICY = GateSettings(max_canary_increase=None)
LOG = logging.getLogger(__name__)
# Three new intents from 18 tickets: 5e-3 learns them in 30 epochs for every seed tried (3e-3 missed one).
LEARNING_RATE = 5e-3
# The second window's candidates, ten seeds of three: twice the rate in half the epochs learns it
# as well (measured: every healthy candidate passed, every poisoned one was rejected) in half the time.
SECOND_WINDOW = {"learning_rate": 1e-2, "epochs": 15}


def answered(truth: str, answers: str, model: str | None = None, among: str = "") -> WindowScore:
    """Probes of labels `truth` (one letter each) given `answers`; the model's own answers are
    `model` (default: the same), each scored e^3 times likelier than every other label (those
    named, and `among`)."""
    correct = [t == a for t, a in zip(truth, answers, strict=True)]
    labels = tuple(sorted({*truth, *answers, *(model or ""), *among}))
    scores = tuple(tuple(0.0 if label == a else -3.0 for label in labels) for a in model or answers)
    return WindowScore(accuracy=sum(correct) / len(correct), loss=0.0, n=len(correct), correct=tuple(correct),
                       truth=tuple(truth), answers=tuple(answers), model_answers=tuple(model or answers),
                       model_scores=scores, labels=labels)


def score(correct: list[bool]) -> WindowScore:
    """Probes of six labels in turn, each answered right or with the next label."""
    truth = ("abcdef" * len(correct))[:len(correct) + 1]
    return answered(truth[:-1], "".join(t if right else truth[i + 1]
                                        for i, (t, right) in enumerate(zip(truth[:-1], correct, strict=True))))


def test_a_significant_drop_is_rejected_and_a_noisy_one_is_not() -> None:
    live = {1: score([True] * 20), 2: score([False] * 20)}
    forgot = {1: score([True] * 10 + [False] * 10), 2: score([True] * 20)}
    report = judge(forgot, live, [2], POLICY)
    assert not report.passed and report.reason.startswith("drop on window 1")
    assert report.checks[0].p_value is not None and report.checks[0].p_value < 0.001
    assert report.retryable  # window 2 was learned: its tickets are not what failed
    assert not judge({**forgot, 2: score([False] * 20)}, live, [2], POLICY).retryable  # nor learned window 2
    noisy = {1: score([True] * 19 + [False]), 2: score([True] * 20)}  # one probe: not significant
    assert judge(noisy, live, [2], POLICY).passed


def test_new_windows_must_be_learned_beyond_chance() -> None:
    live = {1: answered("aaaaaaaaaaabbbbbbbbb", "c" * 20)}
    one_label = {1: answered("aaaaaaaaaaabbbbbbbbb", "a" * 20)}  # 11 of 20 right, learned nothing
    report = judge(one_label, live, [1], POLICY)
    assert not report.passed and "beyond chance" in report.reason and not report.retryable
    shuffled = {1: answered("abababababababababab", "baabbaabbaabbaababab")}  # the label shares, at random
    assert not judge(shuffled, live, [1], POLICY).passed
    assert judge({1: score([True] * 18 + [False] * 2)}, live, [1], POLICY).passed
    # Ten probes split 4-2-2-2, seven right: beyond chance (p < 0.01), though not beyond always
    # answering the commonest label (0.4: p = 0.055), a test this one replaced.
    uneven = answered("aaaabbccdd", "aaaabbcaab")
    report = judge({1: uneven}, {1: answered("aaaabbccdd", "x" * 10)}, [1], POLICY)
    assert report.passed, report.reason
    learned = next(c for c in report.checks if c.name == "window 1 learned beyond chance")
    right, other = 1 / (1 + 3 * math.exp(-3)), math.exp(-3) / (1 + 3 * math.exp(-3))  # among the four labels
    assert learned.observed == pytest.approx(0.7 * right + 0.3 * other) and learned.p_value < 0.01
    assert learned.threshold == pytest.approx(0.32 * right + 0.68 * other)  # each probe meets each label's share


def test_wrong_answers_that_still_favour_the_truth_count_as_learning() -> None:
    # TREC, seed 0, window 2 (`docs/benchmarks.md`): 5 of 8 probes right by the model's answers,
    # which alone cannot tell learning from the label shares (p 0.19); the probabilities it gave
    # each probe's label among the window's, as measured, can (p 0.017).
    truth = "TEEEETET"  # HUM:title, ENTY:event
    given = [0.75, 0.74, 0.78, 0.69, 0.81, 0.58, 0.94, 0.43]  # the truth's share of the two labels
    rows = tuple((math.log(p), math.log(1 - p)) if t == "T" else (math.log(1 - p), math.log(p))
                 for t, p in zip(truth, given, strict=True))
    answers = "TEEEPPEE"  # two probes answered with an earlier window's label, P
    correct = [t == a for t, a in zip(truth, answers, strict=True)]
    window = WindowScore(accuracy=5 / 8, loss=0.0, n=8, correct=tuple(correct), truth=tuple(truth),
                         answers=tuple(answers), model_scores=rows, labels=("T", "E"))
    report = judge({1: window}, {1: answered(truth, "P" * 8)}, [1], POLICY)
    assert report.passed, report.reason
    learned = next(c for c in report.checks if c.name == "window 1 learned beyond chance")
    assert learned.p_value == pytest.approx(0.017, abs=0.01)
    uninformed = window.model_copy(update={"model_scores": ((math.log(0.7), math.log(0.3)),) * 8})
    assert not judge({1: uninformed}, {1: answered(truth, "P" * 8)}, [1], POLICY).passed  # the same for all


def test_a_window_of_one_new_intent_is_judged_against_the_earlier_windows_probes() -> None:
    # Every new probe carries label c: nothing to deal among them. Learned: the model favours c on
    # c's probes and not on the earlier windows' (a, b); not learned: it favours c everywhere.
    earlier = answered("ab" * 10, "ab" * 10, among="c")
    live = {1: earlier, 2: answered("c" * 6, "a" * 6, among="abc")}
    learned = {1: earlier, 2: answered("c" * 6, "c" * 6, among="abc")}
    report = judge(learned, live, [2], POLICY)
    assert report.passed, report.reason
    check = next(c for c in report.checks if c.name == "window 2 learned beyond chance")
    assert check.observed > 0.8 > 0.3 > check.threshold and check.p_value < 0.001
    everywhere = {1: answered("ab" * 10, "ab" * 10, model="c" * 20), 2: answered("c" * 6, "c" * 6, among="abc")}
    report = judge(everywhere, live, [2], POLICY)
    assert not report.passed and "beyond chance" in report.reason, report.reason
    # One probe of a rare intent beside four of a common one: no answers could be significant among
    # them (p >= 1/5), so the new labels are judged against the earlier windows' probes.
    rare = {1: earlier, 2: answered("ccccd", "ccccc", among="abcd")}  # learned c, not d (a measured case)
    live = {1: earlier, 2: answered("ccccd", "aaaaa", among="abcd")}
    report = judge(rare, live, [2], POLICY)
    assert report.passed, report.reason
    everywhere = {1: answered("ab" * 10, "ab" * 10, model="c" * 20), 2: answered("ccccd", "ccccc", among="abcd")}
    assert not judge(everywhere, live, [2], POLICY).passed  # c on the earlier probes too: nothing learned
    # A stream's first window, of one intent: no other label to set it against, nothing to judge.
    report = judge({1: answered("c" * 6, "c" * 6)}, {1: answered("c" * 6, "x" * 6)}, [1], POLICY)
    check = next(c for c in report.checks if c.name == "window 1 learned beyond chance")
    assert report.passed and check.p_value is None and check.detail.startswith("not judged"), report.reason


def test_each_new_window_is_judged_on_its_own_and_only_an_unlearned_one_is_blamed() -> None:
    # A window tried again after a refusal beside the next, scrambled: pooled, window 2's twenty
    # learned probes would carry window 3's chance answers past the test (p < 0.001 for all 40).
    earlier = answered("ab" * 10, "ab" * 10, among="cdefgh")
    live = {1: earlier, 2: answered("cd" * 10, "a" * 20), 3: answered("efgh" * 5, "a" * 20)}
    bundled = {1: earlier, 2: answered("cd" * 10, "cd" * 10), 3: answered("efgh" * 5, "fghe" * 5)}
    report = judge(bundled, live, [2, 3], POLICY)
    assert not report.passed and report.reason.startswith("window 3 learned beyond chance"), report.reason
    assert next(c for c in report.checks if c.name == "window 2 learned beyond chance").passed
    assert report.at_fault == (3,) and not report.retryable  # window 2 may be tried again, window 3 not
    healthy = {**bundled, 3: answered("efgh" * 5, "efgh" * 5)}
    assert judge(healthy, live, [2, 3], POLICY).passed
    # Blamed on every new window where no check tells which: here, the new windows, pooled, served
    # worse than live (window 3's answers lost, though the model alone learned it).
    worse = judge({**healthy, 3: answered("efgh" * 5, "b" * 20, model="efgh" * 5)},
                  {**live, 2: healthy[2], 3: healthy[3]}, [2, 3], POLICY)
    assert worse.reason.startswith("new windows worse than live") and worse.at_fault == (2, 3), worse.reason


def test_learning_is_judged_on_the_models_own_answers_not_the_buffers_echo() -> None:
    # A broken join: the buffer's vote echoes the wrong labels (answers right), the model learned
    # nothing (one label for all).
    truth = "abcabcabcabcabcabcab"
    echoed = answered(truth, truth, model="a" * 20)
    report = judge({1: echoed}, {1: answered(truth, "c" * 20)}, [1], POLICY)
    assert not report.passed and "beyond chance" in report.reason
    learned = next(c for c in report.checks if c.name == "window 1 learned beyond chance")
    assert learned.observed == pytest.approx(learned.threshold) and learned.p_value == 1  # the model's own
    assert judge({1: answered(truth, truth)}, {1: answered(truth, "c" * 20)}, [1], POLICY).passed


def test_new_windows_are_rejected_only_when_significantly_worse_than_live() -> None:
    # The base already answers a window of descriptive labels well; two probes fewer is noise.
    live = {1: score([True] * 23 + [False] * 7)}
    noisy = {1: score([True] * 21 + [False] * 9)}
    assert judge(noisy, live, [1], POLICY).passed
    worse = {1: score([True] * 12 + [False] * 18)}
    report = judge(worse, live, [1], POLICY)
    assert not report.passed and report.reason.startswith("new windows worse than live"), report.reason


def known(correct: list[bool], among_known: list[bool]) -> WindowScore:
    return score(correct).model_copy(update={"known_accuracy": sum(among_known) / len(among_known),
                                             "known_correct": tuple(among_known)})


def test_old_probes_lost_to_new_labels_are_interference_not_forgetting() -> None:
    live = {1: known([True] * 40, [True] * 40), 2: score([False] * 20)}
    # Five old probes now answered with a new, close intent; among the old labels all still right.
    confused = {1: known([True] * 35 + [False] * 5, [True] * 40), 2: score([True] * 20)}
    report = judge(confused, live, [2], POLICY)
    assert report.passed, report.reason
    assert [c.observed for c in report.checks if c.name == "drop on window 1"] == [0.0]
    # Answering half the old probes with the newest labels is past the interference bound.
    recency = {1: known([True] * 20 + [False] * 20, [True] * 40), 2: score([True] * 20)}
    report = judge(recency, live, [2], POLICY)
    assert not report.passed and report.reason.startswith("interference"), report.reason
    # Confusing the old intents among themselves is forgetting, whatever the new labels do.
    forgot = {1: known([True] * 30 + [False] * 10, [True] * 30 + [False] * 10), 2: score([True] * 20)}
    report = judge(forgot, live, [2], POLICY)
    assert not report.passed and report.reason.startswith("drop on window 1"), report.reason


def test_canary_drift_over_the_bound_is_rejected() -> None:
    live, candidate = {1: score([False] * 20)}, {1: score([True] * 20)}
    policy = GateSettings(max_canary_increase=0.1)
    assert judge(candidate, live, [1], policy, canary=Canary(candidate=3.05, live=3.0, base=3.0)).passed
    report = judge(candidate, live, [1], policy, canary=Canary(candidate=3.5, live=3.0, base=3.0))
    assert not report.passed and report.reason.startswith("canary") and not report.retryable
    assert report.model_dump(mode="json")["canary"]["drift"] == pytest.approx(0.5)


INTENTS = {"card_arrival": "card", "exchange_rate": "rate", "top_up_failed": "topup",
           "lost_or_stolen_card": "stolen", "refund_not_showing_up": "refund", "pin_blocked": "pin",
           "atm_support": "atm", "extra_charge_on_statement": "fee", "transfer_timing": "transfer",
           "cash_withdrawal_not_recognised": "cash"}


def window(seed: int, labels: list[str], keywords: dict[str, str], n: int, tag: str) -> list[TicketRecord]:
    rng = random.Random(f"{seed}-{tag}")
    return [TicketRecord(id=f"{tag}-{i}", label=labels[i % len(labels)],
                         text=f"{rng.choice(['hello', 'hi', 'please', 'help'])} my "
                              f"{keywords[labels[i % len(labels)]]} issue {rng.randint(0, 99)}")
            for i in range(n)]


def shuffled_labels(labels: list[str], seed: int) -> list[str]:
    """A random permutation of the labels in which no ticket keeps its own (a broken join)."""
    rng = random.Random(seed)
    shuffled = rng.sample(labels, len(labels))
    for i in range(len(shuffled)):
        if shuffled[i] == labels[i]:
            j = next(j for j in rng.sample(range(len(labels)), len(labels))
                     if shuffled[j] != labels[i] and shuffled[i] != labels[j])
            shuffled[i], shuffled[j] = shuffled[j], shuffled[i]
    assert sorted(shuffled) == sorted(labels) and all(a != b for a, b in zip(shuffled, labels, strict=True))
    return shuffled


FIRST = {label: INTENTS[label] for label in ("card_arrival", "exchange_rate", "top_up_failed")}


@dataclass(frozen=True)
class Learned:
    """Window 1, learned once: the live version every seed's candidates compete with."""

    live: Path
    rows: list[TicketRecord]
    probes: list[TicketRecord]


@pytest.fixture(scope="module")
def learned(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Learned:
    out = tmp_path_factory.mktemp("window1")
    train = TINY_TRAIN.model_copy(update={"learning_rate": LEARNING_RATE})
    rows, probes = window(0, list(FIRST), FIRST, 18, "w1"), window(0, list(FIRST), FIRST, 12, "p1")
    initial_adapter(tiny_llama, out / "v0", train.adapter, 0)
    outcome = train_candidate(Snapshot((1,), rows, [], {1: probes}, tuple(FIRST)), tiny_llama,
                              out / "v0", out / "v1", train, POLICY)
    assert outcome.gate.passed, outcome.gate.reason
    return Learned(out / "v1", rows, probes)


def run_seed(seed: int, base: Path, learned: Learned, out: Path) -> dict[str, bool]:
    """Gate three candidates for a second window of three new intents; each one's verdict."""
    second = random.Random(seed).sample(sorted(set(INTENTS) - set(FIRST)), 3)
    keywords = {label: INTENTS[label] for label in second}
    train = TINY_TRAIN.model_copy(update={"seed": seed, **SECOND_WINDOW})
    rows, probes = window(seed, second, keywords, 18, "w2"), window(seed, second, keywords, 12, "p2")

    def candidate(name: str, new: list[TicketRecord], replay: list[TicketRecord], cfg: TrainSettings) -> bool:
        snapshot = Snapshot((2,), new, replay, {1: learned.probes, 2: probes}, (*FIRST, *second))
        gate = train_candidate(snapshot, base, learned.live, out / name, cfg, POLICY).gate
        LOG.info("seed %d, %s: %s", seed, name, gate.reason)
        return gate.passed

    shuffled = [r.model_copy(update={"label": label})
                for r, label in zip(rows, shuffled_labels([r.label or "" for r in rows], seed), strict=True)]
    # Three times the learning rate, new rows only: it overwrites window 1 within a few epochs.
    reckless = train.model_copy(update={"learning_rate": 3e-2, "epochs": 10, "replay_ratio": 0.0,
                                        "ewc": train.ewc.model_copy(update={"enabled": False})})
    return {"shuffled labels": candidate("shuffled", shuffled, learned.rows, train),
            "large lr, no replay, no EWC": candidate("reckless", rows, [], reckless),
            "healthy": candidate("healthy", rows, learned.rows, train)}


def test_poisoned_updates_are_rejected_and_healthy_ones_accepted(tiny_llama: Path, learned: Learned,
                                                                 tmp_path: Path) -> None:
    verdicts = [run_seed(seed, tiny_llama, learned, tmp_path / str(seed)) for seed in range(10)]
    accepted = {kind: sum(v[kind] for v in verdicts) for kind in verdicts[0]}
    assert accepted["shuffled labels"] == 0, accepted
    assert accepted["large lr, no replay, no EWC"] == 0, accepted
    assert accepted["healthy"] >= 9, accepted


def test_the_gate_scores_a_bounded_share_of_earlier_probes(tiny_llama: Path, learned: Learned,
                                                           tmp_path: Path) -> None:
    second = sorted(set(INTENTS) - set(FIRST))[:3]
    keywords = {label: INTENTS[label] for label in second}
    rows, probes = window(0, second, keywords, 18, "w2"), window(0, second, keywords, 12, "p2")
    snapshot = Snapshot((2,), rows, [], {1: learned.probes, 2: probes}, (*FIRST, *second))
    reckless = TINY_TRAIN.model_copy(update={"learning_rate": 3e-2, "epochs": 10, "replay_ratio": 0.0})
    policy = POLICY.model_copy(update={"probe_budget": 6})
    gate = train_candidate(snapshot, tiny_llama, learned.live, tmp_path / "reckless", reckless, policy).gate
    assert {w: s.n for w, s in gate.candidate.items()} == {1: 6, 2: 12}
    assert {w: s.n for w, s in gate.live.items()} == {1: 6, 2: 12}
    assert not gate.passed, gate.reason  # half of window 1's probes still show it overwritten
    assert gate.seconds is not None and gate.seconds > 0


def test_probes_are_judged_among_their_shortlists(tiny_llama: Path) -> None:
    model, tokenizer = load_base(tiny_llama)
    labels = sorted(INTENTS)
    scorer = LabelScorer(tokenizer, labels)
    probes = {1: window(0, labels[:3], {label: INTENTS[label] for label in labels[:3]}, 6, "p")}
    full = evaluate(model, scorer, probes, known=labels[:3])[1]
    everything = evaluate(model, scorer, probes, known=labels[:3],
                          shortlists={r.id: labels for r in probes[1]})[1]
    assert everything.correct == full.correct and everything.known_correct == full.known_correct
    assert everything.shortlisted == 6 and full.shortlisted == 0
    assert abs(everything.loss - full.loss) < 1e-4
    # A probe whose label is missing from its shortlist is wrong, among all labels and among the known.
    missing = probes[1][0]
    wrong = evaluate(model, scorer, probes, known=labels[:3],
                     shortlists={missing.id: [label for label in labels if label != missing.label]})[1]
    assert wrong.correct[0] is False and wrong.known_correct[0] is False and wrong.shortlisted == 1
    assert wrong.correct[1:] == full.correct[1:]


def test_cached_scores_are_reused_and_judged_alike(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, tokenizer = load_base(tiny_llama)
    labels = sorted(INTENTS)
    scorer = LabelScorer(tokenizer, labels)
    first, second = labels[:3], labels[3:6]
    probes = {1: window(0, first, {label: INTENTS[label] for label in first}, 6, "p1"),
              2: window(0, second, {label: INTENTS[label] for label in second}, 6, "p2")}
    shortlists = {r.id: labels[:5] for r in [*probes[1][:3], *probes[2][:3]]}  # the others: every label
    fresh = score_probes(model, scorer, probes, shortlists)
    scores = finite_scores(fresh, labels)
    # Window 1 known in full; of window 2, four probes' first three labels (a shortlist or all labels).
    cached = {r.id: scores[r.id] for r in probes[1]} | {r.id: dict(list(scores[r.id].items())[:3])
                                                         for r in probes[2][1:5]}
    asked: list[tuple[str, str]] = []  # (probe text, label): what the model was run for
    score_among = LabelScorer.score_among

    def counted(self: LabelScorer, model: torch.nn.Module, texts: Sequence[str],
                shortlists: Sequence[Sequence[str]], batch: int = 8) -> torch.Tensor:
        asked.extend((text, label) for text, short in zip(texts, shortlists, strict=True) for label in short)
        return score_among(self, model, texts, shortlists, batch)

    monkeypatch.setattr(LabelScorer, "score_among", counted)
    reused = score_probes(model, scorer, probes, shortlists, cached)

    assert sorted(asked) == sorted((r.text, label) for r in probes[2] for label in scores[r.id]
                                   if label not in cached.get(r.id, {}))
    assert (reused[1].reused, reused[1].computed) == (sum(len(scores[r.id]) for r in probes[1]), 0)
    assert reused[2].reused == 12 and reused[2].computed == sum(len(scores[r.id]) for r in probes[2]) - 12
    for w in probes:
        before, after = window_score(fresh[w], labels, first), window_score(reused[w], labels, first)
        assert (after.accuracy, after.correct, after.known_correct, after.answers, after.shortlisted) == \
               (before.accuracy, before.correct, before.known_correct, before.answers, before.shortlisted)
        assert abs(after.loss - before.loss) < 1e-5
    # The cached scores are the ones judged: a doctored one changes the answer.
    probe = probes[1][0]
    wrong = next(label for label in first if label != probe.label)
    doctored = {**cached, probe.id: {**cached[probe.id], wrong: 0.0}}
    asked.clear()
    judged = window_score(score_probes(model, scorer, probes, shortlists, doctored)[1], labels, first)
    assert judged.answers[0] == wrong and not judged.correct[0]
    assert not [text for text, _ in asked if text in {r.text for r in probes[1]}]


def test_probes_are_answered_with_the_buffers_vote_as_serving_answers_them() -> None:
    records = [TicketRecord(id="p0", text="card not here", label="card_arrival"),
               TicketRecord(id="p1", text="pin locked", label="pin_blocked")]
    labels = ["card_arrival", "pin_blocked"]
    matrix = ProbeMatrix(records, torch.tensor([[-1.0, -0.5], [-1.0, -0.5]]), shortlisted=0, reused=0, computed=4)
    alone = window_score(matrix, labels, known=labels)
    voted = window_score(matrix, labels, known=labels, votes={"p0": {"card_arrival": 0.9, "pin_blocked": 0.1}},
                         vote_weight=2.0)
    assert alone.correct == (False, True) and alone.answers == ("pin_blocked", "pin_blocked")
    assert voted.correct == (True, True) and voted.known_correct == (True, True)
    assert voted.loss == alone.loss and voted.model_answers == alone.answers  # the model's own
    assert window_score(matrix, labels, votes={"p0": {"card_arrival": 1.0}}, vote_weight=0.0).correct == alone.correct
