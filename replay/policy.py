"""Which rows to hold out, evict and replay: pure functions over ids, groups and random keys.

Every row carries a random key drawn once when it is stored. Keeping the rows with the largest
keys is a reservoir sample of everything stored (each row equally likely to survive); balancing
by group (a label, or a k-means cluster of the embeddings) evicts from the largest group first,
lowest key first, so the classes or regions of the embedding space keep equal shares;
`eviction_groups` says which groups an eviction policy balances, `sample_positions` which rows
a replay sampling policy draws.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import random
from collections import defaultdict
from collections.abc import Callable, Collection, Hashable, Sequence

import faiss
import numpy as np

from replay.config import EvictionPolicy, SamplePolicy


def is_probe(ticket_id: str, probe_percent: int) -> bool:
    """Deterministic held-out split: the same id is always on the same side.

    Examples
    --------
    >>> is_probe("ticket-1", 20) == is_probe("ticket-1", 20)
    True
    """
    return _split_draw(ticket_id)[0] < probe_percent


def probe_draw(ticket_id: str) -> float:
    """The id's draw in [0, 100) for the held-out split: held out when its whole part is under
    `probe_percent` (`is_probe`); the fraction orders ids of the same whole part."""
    whole, fraction = _split_draw(ticket_id)
    return whole + fraction


def _split_draw(ticket_id: str) -> tuple[int, float]:
    # Kept apart so that the side (the whole part) never depends on float rounding of the fraction.
    digest = hashlib.sha256(ticket_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 100, int.from_bytes(digest[8:16], "big") / 2**64


def unlearnable(labels: Sequence[str | None], probe: Sequence[bool], draws: Sequence[float]) -> list[int]:
    """Positions to move to the training side so that every label keeps a training row: a label
    whose every ticket the hash held out would be judged and never learned. The row moved is the
    one whose draw came nearest the line.

    Examples
    --------
    >>> unlearnable(["a", "a", "b", "b", "c", None], [False, True, True, True, True, True], [5, 3, 1, 15, 2, 7])
    [3, 4]
    """
    rows: dict[str, list[int]] = defaultdict(list)
    for position, label in enumerate(labels):
        if label is not None:
            rows[label].append(position)
    return sorted(max(positions, key=lambda p: draws[p]) for positions in rows.values()
                  if all(probe[p] for p in positions))


def eviction_key(ticket_id: str) -> float:
    """The row's reservoir key in [0, 1): a salted hash, so independent of the probe split and
    reproducible across restarts.

    Examples
    --------
    >>> 0 <= eviction_key("t1") < 1 and eviction_key("t1") == eviction_key("t1")
    True
    """
    digest = hashlib.sha256(b"evict:" + ticket_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def choose_victims(groups: Sequence[Hashable], keys: Sequence[float], n: int) -> list[int]:
    """Positions of `n` rows to evict: always from a largest group, its lowest key first.

    With a single group this is reservoir eviction (the lowest keys go).

    Examples
    --------
    >>> sorted(choose_victims(["a", "a", "a", "b"], [0.1, 0.2, 0.3, 0.0], 2))
    [0, 1]
    """
    members: dict[Hashable, list[tuple[float, int]]] = defaultdict(list)
    for position, (group, key) in enumerate(zip(groups, keys, strict=True)):
        members[group].append((key, position))
    for rows in members.values():
        rows.sort(reverse=True)  # pop() then yields the lowest key
    # Largest group first; ties go to the group whose next victim has the lowest key.
    heap = [(-len(rows), rows[-1][0], i, group) for i, (group, rows) in enumerate(members.items())]
    heapq.heapify(heap)
    victims: list[int] = []
    while len(victims) < min(n, len(keys)):
        _, _, i, group = heapq.heappop(heap)
        rows = members[group]
        victims.append(rows.pop()[1])
        if rows:
            heapq.heappush(heap, (-len(rows), rows[-1][0], i, group))
    return victims


def eviction_groups(policy: EvictionPolicy, labels: Sequence[str | None], vectors: Callable[[], np.ndarray],
                    coverage_clusters: int) -> tuple[str, Sequence[Hashable]]:
    """What `policy` resolves to (`auto`: class-balanced when any row carries a label, else
    reservoir) and each row's group under it: its label (`class-balanced`), its k-means cluster
    over `vectors()` (`coverage`, the only one that reads them), or one group for all
    (`reservoir`).

    Examples
    --------
    >>> eviction_groups("auto", ["a", None, "b"], lambda: np.zeros((3, 2)), 32)
    ('class-balanced', ['a', None, 'b'])
    >>> eviction_groups("auto", [None, None], lambda: np.zeros((2, 2)), 32)
    ('reservoir', [0, 0])
    """
    if policy == "auto":
        policy = "class-balanced" if any(label is not None for label in labels) else "reservoir"
    if policy == "class-balanced":
        return policy, list(labels)
    if policy == "coverage":
        return policy, clusters(vectors(), coverage_clusters).tolist()
    return policy, [0] * len(labels)


def sample_positions(policy: SamplePolicy, labels: Sequence[str | None], vectors: Callable[[], np.ndarray],
                     k: int, seed: int | None, coverage_clusters: int) -> list[int]:
    """Positions of up to `k` distinct rows, drawn by `policy`: `uniform`, `class-balanced` (by
    `labels`, as even as their counts allow) or `coverage` (even over k-means clusters of
    `vectors()`, the only one that reads them).

    Examples
    --------
    >>> labels = ["a"] * 8 + ["b"] * 2
    >>> sorted(labels[p] for p in sample_positions("class-balanced", labels, lambda: np.zeros((10, 2)), 4, 0, 32))
    ['a', 'a', 'b', 'b']
    """
    if policy == "uniform":
        return random.Random(seed).sample(range(len(labels)), min(k, len(labels)))
    if policy == "class-balanced":
        return balanced_sample(labels, k, seed)
    if policy == "coverage":
        groups = clusters(vectors(), coverage_clusters, seed=seed or 0) if labels else np.zeros(0)
        return balanced_sample(groups.tolist(), k, seed)
    raise ValueError(f"unknown sampling policy {policy!r}")


def replay_rows(new_labels: Sequence[str | None], old_labels: Collection[str]) -> int:
    """How many replay rows an update draws: as many per earlier label as the new rows have per
    new label, so that earlier labels are seen as often as new ones; without labels on either
    side, as many as the new rows.

    >>> replay_rows(["card"] * 10 + ["rate"] * 6, {"fee", "pin", "atm"})  # 8 per new label
    24
    >>> replay_rows([None] * 5, set())
    5
    """
    labelled = {label for label in new_labels if label}
    if not labelled or not old_labels:
        return len(new_labels)
    return math.ceil(len(new_labels) / len(labelled)) * len(old_labels)


def balanced_sample(groups: Sequence[Hashable], k: int, seed: int | None = None) -> list[int]:
    """Positions of `k` distinct rows, spread over the groups as evenly as their sizes allow.

    A group gets fewer than another only when it has run out of rows.

    Examples
    --------
    >>> groups = ["a"] * 8 + ["b"] * 2
    >>> sorted(groups[p] for p in balanced_sample(groups, 6, seed=0))
    ['a', 'a', 'a', 'a', 'b', 'b']
    """
    rng = random.Random(seed)
    members: dict[Hashable, list[int]] = defaultdict(list)
    for position, group in enumerate(groups):
        members[group].append(position)
    for rows in members.values():
        rng.shuffle(rows)
    order = list(members)
    rng.shuffle(order)  # which groups get the remainder is random, not alphabetical
    heap = [(0, i, group) for i, group in enumerate(order)]
    picked: list[int] = []
    while heap and len(picked) < k:
        taken, i, group = heapq.heappop(heap)
        rows = members[group]
        picked.append(rows.pop())
        if rows:
            heapq.heappush(heap, (taken + 1, i, group))
    return picked


def clusters(vectors: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Spherical k-means cluster of each row (FAISS); fewer clusters when rows are few.

    Examples
    --------
    >>> v = np.repeat(np.eye(3, dtype=np.float32), 50, axis=0)
    >>> len(set(clusters(v, 3).tolist()))
    3
    """
    # FAISS wants about 39 points per centroid; below that the clusters are noise.
    k = max(1, min(k, len(vectors) // 39))
    if k == 1:
        return np.zeros(len(vectors), dtype=np.int64)
    kmeans = faiss.Kmeans(vectors.shape[1], k, niter=10, seed=seed, spherical=True, verbose=False)
    kmeans.train(np.ascontiguousarray(vectors, dtype=np.float32))
    _, assigned = kmeans.index.search(np.ascontiguousarray(vectors, dtype=np.float32), 1)
    return assigned[:, 0].astype(np.int64)
