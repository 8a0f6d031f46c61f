"""Our accuracy rows fed to Avalanche's standalone `BWT` and `Forgetting` metrics.

Used to cross-check `learners.accuracy_matrix` (the conformance test and `bench/cl.py`). Avalanche
(avalanche-lib, in the `dev` and `bench` extras) is imported here only, never by the service.
Avalanche compares the first accuracy recorded after a window was learned (`initial`) with the
latest one; our BWT is that definition exactly, our forgetting the max-based one, which equals
Avalanche's whenever a window peaked when it was learned and exceeds it otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

from avalanche.evaluation.metrics import BWT, Forgetting

from learners.accuracy_matrix import Row


def avalanche_stream(rows: Sequence[Row]) -> tuple[BWT, Forgetting]:
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
