"""Our forgetting figures against Avalanche's standalone metrics, on random accuracy matrices
(the definitions compared are in `learners/avalanche_metrics.py`)."""

from __future__ import annotations

from statistics import fmean

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from learners.accuracy_matrix import Row, summarize
from learners.avalanche_metrics import avalanche_stream

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
