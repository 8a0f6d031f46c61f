"""Exact tests for small probe sets: the gate acts on a difference only when it is real.

Both tests are exact (binomial), so they hold for the few dozen probes a window has, where
normal approximations do not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


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
    """Exact one-sided McNemar test of "after is worse than before" on the same records."""

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
