"""Our forgetting figures against Avalanche's standalone metrics, on random accuracy matrices.

Avalanche's `BWT` and `Forgetting` compare the first accuracy recorded after a window was
learned (`initial`) with the latest one. Our BWT is that definition exactly; our forgetting
is the standard max-based one (best accuracy under any earlier version minus now), so it
equals Avalanche's whenever a window peaked when it was learned and exceeds it otherwise.
"""

from __future__ import annotations

from statistics import fmean

import pytest
from avalanche.evaluation.metrics import BWT, Forgetting
from hypothesis import given, settings
from hypothesis import strategies as st

from learners.metrics import Row, summarize

accuracy = st.integers(0, 40).map(lambda right: right / 40)  # a 40-probe accuracy


@st.composite
def lineages(draw: st.DrawFn) -> list[Row]:
    """Versions that each learn one or two new windows, measured on every window."""
    windows = draw(st.integers(2, 6))
    rows, trained = [], 0
    while trained < windows:
        trained = min(windows, trained + draw(st.integers(1, 2)))
        rows.append(Row(f"v{len(rows) + 1}", frozenset(range(1, trained + 1)),
                        {j: draw(accuracy) for j in range(1, windows + 1)}))
    return rows


def avalanche_stream(rows: list[Row]) -> tuple[BWT, Forgetting]:
    """Feed Avalanche as its plugins do: `initial` right after a window is learned, `last` at the end."""
    bwt, forgetting = BWT(), Forgetting()
    for row in rows:
        for j in sorted(row.trained):
            if j not in bwt.initial:
                bwt.update(j, row.accuracy[j], initial=True)
                forgetting.update(j, row.accuracy[j], initial=True)
    final = rows[-1]
    learned_at = {j: next(k for k, r in enumerate(rows) if j in r.trained) for j in final.trained}
    for j in sorted(final.trained):
        if learned_at[j] < len(rows) - 1:
            bwt.update(j, final.accuracy[j])
            forgetting.update(j, final.accuracy[j])
    return bwt, forgetting


@settings(max_examples=300, deadline=None)
@given(lineages())
def test_bwt_and_forgetting_agree_with_avalanche(rows: list[Row]) -> None:
    ours = summarize(rows)[-1]
    bwt, forgetting = avalanche_stream(rows)
    theirs_bwt = bwt.result()
    if theirs_bwt:
        assert ours.backward_transfer == pytest.approx(fmean(theirs_bwt.values()))
    else:
        assert ours.backward_transfer is None
    theirs = forgetting.result()
    assert set(ours.forgetting) == set(theirs)
    for j, value in theirs.items():
        assert ours.forgetting[j] >= value - 1e-12
        peak_when_learned = all(r.accuracy[j] <= bwt.initial[j] for r in rows[:-1] if j in r.trained)
        if peak_when_learned:
            assert ours.forgetting[j] == pytest.approx(value)
