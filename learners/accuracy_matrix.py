"""The accuracy matrix's rows and the forgetting figures over them, with the standard definitions.

Rows are adapter versions in the order they were live (the lineage), columns are windows;
`R[k][j]` is version k's accuracy on window j's probe set. The service stores the matrix
(`service.forgetting.AccuracyMatrix`); this module only computes over its rows. A version may learn several windows
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


@dataclass(frozen=True)
class Prefix:
    """What the rows so far leave for the next row's figures, so that a row's summary costs
    O(windows) however long its lineage: versions with a common ancestor share its prefix.

    Attributes
    ----------
    learned
        Window → accuracy of the row that first learned it (None where it was not measured on it).
    best
        Window → best accuracy of any row since the window was learned.
    last
        The previous row's accuracy.
    """

    learned: Mapping[int, float | None] = field(default_factory=dict)
    best: Mapping[int, float] = field(default_factory=dict)
    last: Mapping[int, float] = field(default_factory=dict)


def step(prefix: Prefix, row: Row, base: Mapping[int, float] | None = None) -> tuple[Summary, Prefix]:
    """`row`'s figures after the rows `prefix` stands for, and the prefix including `row`."""
    base = base or {}
    acc, before = row.accuracy, prefix.last
    old = [j for j in sorted(row.trained) if j in prefix.learned and j in acc]
    new = [j for j in sorted(row.trained) if j not in prefix.learned and j in acc]
    forgetting = {j: prefix.best[j] - acc[j] for j in old if j in prefix.best}
    backward = _mean([acc[j] - learned for j in old if (learned := prefix.learned[j]) is not None])
    summary = Summary(
        version=row.version,
        average_accuracy=_mean([acc[j] for j in sorted(row.trained) if j in acc]),
        forgetting=forgetting,
        average_forgetting=_mean(list(forgetting.values())),
        drop_since_learned=None if backward is None else -backward,
        backward_transfer=backward,
        forward_transfer=_mean([before[j] - base[j] for j in new if j in before and j in base]),
        plasticity=_mean([acc[j] - before[j] for j in new if j in before]),
    )
    learned = {**prefix.learned, **{j: acc.get(j) for j in row.trained if j not in prefix.learned}}
    best = dict(prefix.best)
    for j in learned.keys() & acc.keys():
        best[j] = max(best.get(j, acc[j]), acc[j])
    return summary, Prefix(learned, best, acc)


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
    summaries = []
    prefix = Prefix()
    for row in rows:
        summary, prefix = step(prefix, row, base)
        summaries.append(summary)
    return summaries
