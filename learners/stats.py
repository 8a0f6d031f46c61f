"""Tests for small probe sets: the gate acts on a difference only when it is real.

They are exact (binomial) or permutation tests, so they hold for the few dozen probes a window
has, where normal approximations do not.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np


def binomial_tail(successes: int, trials: int, p: float) -> float:
    """P(X ≥ successes) for X ~ Binomial(trials, p).

    >>> round(binomial_tail(10, 10, 0.5), 6)
    0.000977
    >>> binomial_tail(0, 10, 0.5)
    1.0
    """
    if successes <= 0:
        return 1.0
    return min(1.0, sum(math.comb(trials, k) * p**k * (1 - p) ** (trials - k)
                        for k in range(successes, trials + 1)))


@dataclass(frozen=True)
class PairedTest:
    """A one-sided test of "after is worse than before" on the same records (exact McNemar on
    right and wrong, `paired_regression`; a permutation test on figures, `paired_increase`)."""

    lost: int  # right before, wrong after
    gained: int  # wrong before, right after
    p_value: float


def paired_regression(before: Sequence[bool], after: Sequence[bool]) -> PairedTest:
    """Only discordant pairs carry evidence; under "no change" each is a fair coin.

    >>> paired_regression([True] * 8, [False] * 8).p_value < 0.01
    True
    >>> paired_regression([True, False], [False, True]).p_value
    0.75
    """
    if len(before) != len(after):
        raise ValueError("paired test needs the same records before and after")
    lost = sum(b and not a for b, a in zip(before, after, strict=True))
    gained = sum(a and not b for b, a in zip(before, after, strict=True))
    return PairedTest(lost, gained, binomial_tail(lost, lost + gained, 0.5))


def paired_increase(before: Sequence[float], after: Sequence[float], rounds: int = 20000,
                    seed: int = 0) -> PairedTest:
    """One-sided paired permutation test of "after is larger than before" on the same records:
    under "no change" each record's difference is as likely to have the other sign, so the
    p-value is the share of sign flips whose mean difference reaches the observed one. Exact
    (every flip) up to 16 records that changed, a seeded Monte Carlo test of `rounds` beyond.
    Unlike a sign test it weighs how much each record moved: a few large losses outweigh many
    tiny gains.

    >>> paired_increase([1.0] * 8, [2.0] * 8).p_value
    0.00390625
    >>> paired_increase([1.0, 2.0, 3.0], [1.0, 1.5, 3.5]).p_value
    0.75
    """
    if len(before) != len(after):
        raise ValueError("paired test needs the same records before and after")
    diffs = np.array([a - b for b, a in zip(before, after, strict=True)], dtype=np.float64)
    diffs = diffs[diffs != 0]
    rose, fell = int((diffs > 0).sum()), int((diffs < 0).sum())
    if not len(diffs):
        return PairedTest(0, 0, 1.0)
    if len(diffs) <= 16:
        signs = 1 - 2 * ((np.arange(2 ** len(diffs))[:, None] >> np.arange(len(diffs))) & 1)
        return PairedTest(rose, fell, float(np.mean(signs @ diffs >= diffs.sum() - 1e-12)))
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(rounds, len(diffs)))
    return PairedTest(rose, fell, float((np.sum(signs @ diffs >= diffs.sum() - 1e-12) + 1) / (rounds + 1)))


def chance_agreement(truth: Sequence[Hashable], answers: Sequence[Hashable]) -> float:
    """Expected accuracy of answers drawn independently of the truth, with the same label shares.

    Always answering one label scores that label's share; answering as often as each label
    occurs, but at random, scores the sum of the squared shares.

    >>> chance_agreement(["a", "a", "b", "b"], ["a", "a", "a", "a"])
    0.5
    >>> chance_agreement(["a", "a", "b", "b"], ["b", "a", "a", "b"])
    0.5
    >>> labels = ["a"] * 4 + ["b", "b", "c", "d", "e", "f"]
    >>> round(chance_agreement(labels, labels), 2)
    0.24
    """
    n = len(truth)
    true_share, answer_share = Counter(truth), Counter(answers)
    return sum(count * answer_share[label] for label, count in true_share.items()) / (n * n) if n else 0.0


def permutation_tail(truth: Sequence[Hashable], answers: Sequence[Hashable], rounds: int = 2000,
                     seed: int = 0) -> float:
    """P(as many answers right as observed) if the answers were independent of the truth.

    The truth is shuffled among the records `rounds` times (a seeded Monte Carlo permutation
    test, exact in the limit and valid at any size: the observed arrangement counts as one of
    the shuffles, so the p-value is never below 1 / (rounds + 1)). Unlike a test against the
    commonest label's share, it credits a window of few, unevenly split probes for answering
    each label right, and still fails answers that only follow the label shares.

    >>> permutation_tail(list("aabbccdd"), list("aabbccdd")) < 0.01
    True
    >>> permutation_tail(list("aaaabbbb"), list("aaaaaaaa"))  # one label always: nothing learned
    1.0
    """
    codes = {label: i for i, label in enumerate({*truth, *answers})}
    true = np.array([codes[label] for label in truth])
    answered = np.array([codes[label] for label in answers])
    observed = int((true == answered).sum())
    shuffled = np.random.default_rng(seed).permuted(np.broadcast_to(true, (rounds, len(true))), axis=1)
    as_good = int(((shuffled == answered).sum(axis=1) >= observed).sum())
    return (1 + as_good) / (1 + rounds)
