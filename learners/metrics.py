"""Forgetting metrics over the accuracy matrix, with the standard definitions.

Rows are adapter versions in the order they were live (the lineage), columns are windows;
`R[k][j]` is version k's accuracy on window j's probe set. A version may learn several windows
at once (after a rejected candidate), so "the version that learned j" is the first row whose
`trained` set holds j.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from statistics import fmean


@dataclass(frozen=True)
class Row:
    version: str
    trained: frozenset[int]  # every window this version has been trained on
    accuracy: Mapping[int, float]  # window → accuracy, trained or not


@dataclass(frozen=True)
class Summary:
    """Figures of one row; None where a figure has no windows to average over."""

    version: str
    average_accuracy: float | None
    forgetting: dict[int, float] = field(default_factory=dict)
    average_forgetting: float | None = None
    drop_since_learned: float | None = None  # Avalanche's `Forgetting`: accuracy when learned − now
    backward_transfer: float | None = None
    forward_transfer: float | None = None
    plasticity: float | None = None


def _mean(values: list[float]) -> float | None:
    return fmean(values) if values else None


def summarize(rows: Sequence[Row], base: Mapping[int, float] | None = None) -> list[Summary]:
    """Average accuracy, forgetting, BWT, forward transfer and plasticity for every row.

    Examples
    --------
    >>> rows = [Row("v1", frozenset({1}), {1: 0.9, 2: 0.1}),
    ...         Row("v2", frozenset({1, 2}), {1: 0.7, 2: 0.8})]
    >>> s = summarize(rows, base={1: 0.2, 2: 0.0})[1]
    >>> round(s.average_accuracy, 3), round(s.forgetting[1], 3), round(s.backward_transfer, 3)
    (0.75, 0.2, -0.2)
    >>> round(s.forward_transfer, 3), round(s.plasticity, 3)
    (0.1, 0.7)
    >>> rising = [Row("v1", frozenset({1}), {1: 0.5}), Row("v2", frozenset({1, 2}), {1: 0.9, 2: 0.8}),
    ...           Row("v3", frozenset({1, 2}), {1: 0.8, 2: 0.8})]  # window 1 peaked after it was learned
    >>> s = summarize(rising)[2]
    >>> round(s.average_forgetting, 3), round(s.drop_since_learned, 3)  # from the peak; from when learned
    (0.05, -0.15)
    """
    base = base or {}
    first: dict[int, int] = {}
    for k, row in enumerate(rows):
        for j in row.trained:
            first.setdefault(j, k)
    summaries = []
    for k, row in enumerate(rows):
        acc = row.accuracy
        old = [j for j in sorted(row.trained) if first[j] < k and j in acc]
        new = [j for j in sorted(row.trained) if first[j] == k and j in acc]
        forgetting = {}
        for j in old:
            seen = [rows[i].accuracy[j] for i in range(first[j], k) if j in rows[i].accuracy]
            if seen:
                forgetting[j] = max(seen) - acc[j]
        before = rows[k - 1].accuracy if k > 0 else {}
        backward = _mean([acc[j] - rows[first[j]].accuracy[j] for j in old if j in rows[first[j]].accuracy])
        summaries.append(Summary(
            version=row.version,
            average_accuracy=_mean([acc[j] for j in sorted(row.trained) if j in acc]),
            forgetting=forgetting,
            average_forgetting=_mean(list(forgetting.values())),
            drop_since_learned=None if backward is None else -backward,
            backward_transfer=backward,
            forward_transfer=_mean([before[j] - base[j] for j in new if j in before and j in base]),
            plasticity=_mean([acc[j] - before[j] for j in new if j in before]),
        ))
    return summaries
