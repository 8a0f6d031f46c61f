"""The gate protects replies as it protects labels (issue 14): a candidate that answers earlier
windows' tickets with the wrong reply is rejected, a healthy one is not."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from learners.config import GateSettings
from learners.gate import judge
from learners.reports import ReplyScore
from learners.update_step import initial_adapter, train_candidate
from replay.buffer import Snapshot
from streams.records import TicketRecord
from tests.conftest import TINY_TRAIN

POLICY = GateSettings(max_canary_increase=None, reply_generations=12, reply_max_tokens=20)
TRAIN = TINY_TRAIN.model_copy(update={"learning_rate": 5e-3})
REPLIES = {"card_arrival": "Your card is on its way and arrives within three working days.",
           "exchange_rate": "Our rates follow the market and change every hour on weekdays.",
           "top_up_failed": "Please check the card you top up with and try again in the app."}
KEYWORDS = {"card_arrival": "card", "exchange_rate": "rate", "top_up_failed": "topup"}


def tickets(seed: int, n: int, tag: str, replies: dict[str, str] = REPLIES) -> list[TicketRecord]:
    rng, labels = random.Random(f"{seed}-{tag}"), list(REPLIES)
    return [TicketRecord(id=f"{tag}-{i}", label=(label := labels[i % 3]), reply=replies[label],
                         text=f"{rng.choice(['hello', 'hi', 'please', 'help'])} my {KEYWORDS[label]} issue "
                              f"{rng.randint(0, 99)}")
            for i in range(n)]


def test_a_candidate_that_swaps_replies_across_intents_is_rejected(tiny_llama: Path, tmp_path: Path) -> None:
    rows, probes = tickets(0, 24, "w1"), tickets(0, 18, "p1")
    initial_adapter(tiny_llama, tmp_path / "v0", TRAIN.adapter, 0)
    first = train_candidate(Snapshot((1,), rows, [], {1: probes}, tuple(REPLIES)), tiny_llama, tmp_path / "v0",
                            tmp_path / "v1", TRAIN, POLICY)
    assert first.gate.passed and not first.gate.replies_candidate  # no earlier window: nothing to compare

    labels = list(REPLIES)
    swapped = {label: REPLIES[labels[(i + 1) % 3]] for i, label in enumerate(labels)}  # each gets another's
    verdicts, window_2 = {}, tickets(1, 12, "w2")
    for name, replies in (("healthy", REPLIES), ("swapped", swapped)):
        snapshot = Snapshot((2,), tickets(1, 24, "w2", replies), rows, {1: probes, 2: tickets(1, 9, "p2", replies)},
                            tuple(REPLIES))
        verdicts[name] = train_candidate(snapshot, tiny_llama, tmp_path / "v1", tmp_path / name, TRAIN, POLICY).gate

    healthy, poisoned = verdicts["healthy"], verdicts["swapped"]
    assert healthy.passed, healthy.reason
    # Its answer loss on the reference replies fell (window 1's rows were replayed; measured 0.12 ->
    # 0.09 nats/token): only the greedy answers show the swap (ROUGE-L 0.88 -> 0.47).
    assert not poisoned.passed and poisoned.reason.startswith("reply ROUGE-L drop"), poisoned.reason
    assert {w: s.n for w, s in poisoned.replies_candidate.items()} == {1: 18}  # earlier windows only
    assert poisoned.replies_candidate[1].answered == POLICY.reply_generations
    live, candidate = poisoned.replies_live[1], poisoned.replies_candidate[1]
    assert (candidate.rouge_l or 0) < (live.rouge_l or 0) - POLICY.max_reply_rouge_drop
    report = poisoned.model_dump(mode="json")
    assert report["replies_candidate"]["1"]["rouge_l"] == pytest.approx(candidate.rouge_l)
    assert "losses" not in report["replies_candidate"]["1"]
    assert first.gate.live_replies_reused == healthy.live_replies_reused == 0  # v1 was judged on no reply probes

    # The next update judges against the healthy version: its figures on window 1, computed when it was
    # the candidate, are read back (every loss, and the 6 answers of 12 now given to window 1), not computed.
    third = train_candidate(Snapshot((3,), tickets(2, 6, "w3"), window_2,
                                     {1: probes, 2: tickets(1, 9, "p2"), 3: tickets(2, 9, "p3")}, tuple(REPLIES)),
                            tiny_llama, tmp_path / "healthy", tmp_path / "v3", TRAIN, POLICY).gate
    assert third.live_replies_reused == 18 + 6
    assert third.replies_live[1].losses == healthy.replies_candidate[1].losses
    assert third.replies_live[1].rouges == healthy.replies_candidate[1].rouges[:6]
    assert third.replies_live[2].answered == 6 and third.replies_live[2].reused == 0


def reply(losses: list[float], rouges: list[float]) -> ReplyScore:
    return ReplyScore(n=len(losses), loss=sum(losses) / len(losses), answered=len(rouges),
                      rouge_l=sum(rouges) / len(rouges), losses=tuple(losses), rouges=tuple(rouges))


def test_a_reply_regression_counts_only_past_its_threshold_and_when_significant() -> None:
    live = {1: reply([1.0] * 6, [0.9] * 6)}
    worse = {1: reply([1.5] * 6, [0.5] * 6)}
    noisy = {1: reply([3.5, 0.2, 1.0, 1.0, 1.0, 1.0], [0.1, 1.0, 0.9, 0.9, 0.9, 0.9])}  # worse by one probe
    slight = {1: reply([1.1] * 6, [0.85] * 6)}  # every probe worse, by less than the thresholds
    verdict = {name: judge({}, {}, [], POLICY, replies=(scores, live))
               for name, scores in (("worse", worse), ("noisy", noisy), ("slight", slight))}
    assert not verdict["worse"].passed and verdict["worse"].reason.startswith("reply loss increase")
    assert verdict["noisy"].passed and verdict["slight"].passed
    off = POLICY.model_copy(update={"max_reply_loss_increase": None, "max_reply_rouge_drop": None})
    assert judge({}, {}, [], off, replies=(worse, live)).passed
