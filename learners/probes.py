"""Which probes the gate scores: all of the new windows', a bounded share of the earlier ones'.

Scoring every probe of every earlier window makes each update cost more than the one before it;
a fixed budget, spread evenly over the earlier windows, keeps the gate's cost flat. Each window's
share is a prefix of a fixed order of its probes (labels in turn, each label's probes by a hash
of their id), so a window is judged on the same probes from one update to the next, and on a
subset of them when its share shrinks as windows pile up.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Mapping, Sequence
from itertools import zip_longest

from streams.records import TicketRecord


def stratified_order(records: Sequence[TicketRecord]) -> list[TicketRecord]:
    """Labelled records, one label after another (sorted), each label's records by hash of id.

    >>> rows = [TicketRecord(id=str(i), text="t", label=label) for i, label in enumerate("aaabbc")]
    >>> [r.label for r in stratified_order(rows)]
    ['a', 'b', 'c', 'a', 'b', 'a']
    """
    by_label: dict[str, list[TicketRecord]] = defaultdict(list)
    for r in records:
        if r.label is not None:
            by_label[r.label].append(r)
    queues = [sorted(rows, key=lambda r: hashlib.sha1(r.id.encode()).digest()) for _, rows in sorted(by_label.items())]
    return [r for turn in zip_longest(*queues) for r in turn if r is not None]


def budgeted_probes(probes: Mapping[int, Sequence[TicketRecord]], new_windows: Sequence[int],
                    budget: int | None) -> dict[int, list[TicketRecord]]:
    """The probes to score: every new window's, and at most `budget` of the earlier windows'.

    The budget goes round the earlier windows one probe at a time. Where it starts moves on by
    the budget with each new window, so when there are more windows than probes to spend, the
    windows take turns over successive updates; a window that gets none is left out.

    >>> rows = lambda w, n: [TicketRecord(id=f"{w}-{i}", text="t", label=f"l{i % 2}") for i in range(n)]
    >>> probes = {1: rows(1, 10), 2: rows(2, 3), 3: rows(3, 10), 4: rows(4, 10)}
    >>> {w: len(p) for w, p in budgeted_probes(probes, [4], 8).items()}
    {1: 3, 2: 2, 3: 3, 4: 10}
    >>> {w: len(p) for w, p in budgeted_probes(probes, [4], 2).items()}
    {1: 1, 3: 1, 4: 10}
    >>> budgeted_probes(probes, [4], None) == {w: list(p) for w, p in probes.items()}
    True
    """
    old = sorted(w for w in probes if w not in new_windows)
    chosen = {w: list(p) for w, p in probes.items() if w not in old}
    if budget is None or sum(len(probes[w]) for w in old) <= budget:
        return {w: list(p) for w, p in probes.items()}
    orders = {w: stratified_order(probes[w]) for w in old}
    start = max(new_windows, default=0) * budget % len(old)
    turn = old[start:] + old[:start]
    share = dict.fromkeys(old, 0)
    while budget > 0:
        takers = [w for w in turn if share[w] < len(orders[w])][:budget]
        if not takers:  # only unlabelled probes are left, and they are never scored
            break
        for w in takers:
            share[w] += 1
        budget -= len(takers)
    chosen.update({w: orders[w][:share[w]] for w in old if share[w]})
    return dict(sorted(chosen.items()))
