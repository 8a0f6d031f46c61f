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


@dataclass(frozen=True)
class LabelDependence:
    """How much probability a model gives each record's true label (`observed`, a mean over the
    records), what it would give if the labels were dealt to the records at random (`chance`),
    and the permutation p-value of the difference."""

    observed: float
    chance: float
    p_value: float


def label_dependence(probabilities: np.ndarray, truth: Sequence[int], rounds: int = 2000,
                     seed: int = 0) -> LabelDependence:
    """Whether a model's answers depend on the records' labels: the probability it gives each
    record's true label, summed, against the same sums with the labels shuffled among the records.

    `probabilities` holds one row per record, one column per label; `truth` each record's column.
    A seeded Monte Carlo permutation test (the observed arrangement counts as one of the shuffles,
    so p is never below 1 / (rounds + 1)); exact at any size, and a model that answers with the
    label shares alone, or with labels unrelated to its tickets, stays at chance. Probabilities
    rather than right-or-wrong answers: eight probes answered 5 right, whose wrong answers still
    gave the truth most of the new labels' probability, are no evidence by their answers (p 0.19)
    and clear evidence by their probabilities (p 0.017; a TREC window, `docs/benchmarks.md`).

    >>> learned = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6],
    ...                     [0.6, 0.4], [0.1, 0.9]])
    >>> test = label_dependence(learned, [0, 0, 1, 1, 0, 1, 0, 1])
    >>> round(test.observed, 3), round(test.chance, 3), test.p_value < 0.05
    (0.75, 0.5, True)
    >>> label_dependence(np.array([[0.9, 0.1]] * 8), [0, 0, 1, 1, 0, 1, 0, 1]).p_value  # one answer for all
    1.0
    """
    truth = np.asarray(truth)
    n = len(truth)
    if not n:
        return LabelDependence(0.0, 0.0, 1.0)
    rows = np.arange(n)
    observed = float(probabilities[rows, truth].sum())
    shuffled = np.random.default_rng(seed).permuted(np.broadcast_to(truth, (rounds, n)), axis=1)
    as_high = int((probabilities[rows, shuffled].sum(axis=1) >= observed - 1e-9).sum())
    chance = float(probabilities[:, truth].sum() / n)  # the permutations' exact mean: each row meets every label
    return LabelDependence(observed / n, chance / n, (1 + as_high) / (1 + rounds))


def smallest_p_value(truth: Sequence[Hashable]) -> float:
    """The p-value `label_dependence` gives a model that puts all the probability on every
    record's own label: the chance that the labels, dealt at random, land as they are
    (prod(c!) / n! for label counts c). At or above alpha, no answers could pass the test.

    >>> round(smallest_p_value("aaaab"), 6)  # one record of a rare label among five: 1 in 5
    0.2
    >>> round(smallest_p_value("aabbcc"), 6)
    0.011111
    """
    counts = Counter(truth).values()
    return math.exp(sum(math.lgamma(c + 1) for c in counts) - math.lgamma(len(truth) + 1))
