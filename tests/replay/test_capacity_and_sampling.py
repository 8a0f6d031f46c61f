"""Capacity with eviction policies, sampling policies, index kinds (real FAISS), and property
tests of the invariants every policy keeps."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replay.buffer import ReplayBuffer, is_probe
from replay.config import ReplaySettings
from replay.embed import SentenceEmbedder
from replay.policy import balanced_sample, choose_victims
from streams.datasets import load_tickets
from streams.records import TicketRecord

BANKING = load_tickets("banking77", "train")


def by_label(labels: list[str], counts: list[int]) -> list[TicketRecord]:
    """Real BANKING77 tickets: `counts[i]` of intent `labels[i]`."""
    out: list[TicketRecord] = []
    for label, n in zip(labels, counts, strict=True):
        out.extend([t for t in BANKING if t.label == label][:n])
    return out


def train_counts(buffer: ReplayBuffer, windows: list[int]) -> Counter[str | None]:
    return Counter(r.label for r in buffer.records(windows, probe=False))


def test_class_balanced_eviction_keeps_the_classes_even(tmp_path: Path, embedder: SentenceEmbedder) -> None:
    capacity = 60
    buffer = ReplayBuffer(tmp_path, embedder, settings=ReplaySettings(capacity=capacity))  # `auto` policy
    skewed = by_label(["card_arrival", "exchange_rate", "top_up_failed"], [90, 30, 12])
    buffer.add_many(skewed[:60])  # over nothing yet: the open window is never evicted
    assert len(buffer) == 60
    first = buffer.close_window()
    buffer.add_many(skewed[60:])
    second = buffer.close_window()
    assert first is not None and second is not None
    assert len(buffer) == capacity and buffer.stats["evicted"] == len(skewed) - capacity
    counts = train_counts(buffer, [first, second])
    probes = len(buffer.records([first, second], probe=True))
    assert probes == sum(is_probe(t.id, 20) for t in skewed)  # probes are never evicted
    # The small class keeps every row; the big ones are cut to the same level.
    small = sum(1 for t in skewed if t.label == "top_up_failed" and not is_probe(t.id, 20))
    assert counts["top_up_failed"] == small
    assert abs(counts["card_arrival"] - counts["exchange_rate"]) <= 1


def test_reservoir_and_coverage_policies_respect_capacity(tmp_path: Path, embedder: SentenceEmbedder) -> None:
    tickets = by_label(["card_arrival", "exchange_rate", "top_up_failed", "lost_or_stolen_card"], [40] * 4)
    for policy in ("reservoir", "coverage"):
        buffer = ReplayBuffer(tmp_path / policy, embedder,
                              settings=ReplaySettings(capacity=80, eviction=policy, coverage_clusters=4))
        buffer.add_many(tickets)
        buffer.close_window()
        assert len(buffer) == 80 and buffer.index_matches_rows()
        assert buffer.search(tickets[0].text, k=3)  # evicted rows never come back from search
        # Every class keeps some rows: neither policy wipes a region out.
        assert len(train_counts(buffer, [1])) == 4


def test_sampling_policies(tmp_path: Path, embedder: SentenceEmbedder) -> None:
    # No label vote: it would hold 3 of top_up_failed's 8 tickets back from replay (kNN votes
    # favour large classes), and this test is about the policies' balance.
    buffer = ReplayBuffer(tmp_path, embedder, settings=ReplaySettings(disagreement_k=0))
    buffer.add_many(by_label(["card_arrival", "exchange_rate", "top_up_failed"], [40, 40, 8]))
    window = buffer.close_window()
    assert window is not None
    balanced = Counter(r.label for r in buffer.sample(18, [window], seed=1, policy="class-balanced"))
    assert sorted(balanced.values()) == [6, 6, 6]
    covered = buffer.sample(30, [window], seed=1, policy="coverage")
    assert len({r.id for r in covered}) == 30
    assert buffer.sample(30, [window], seed=1) == buffer.sample(30, [window], seed=1)  # seeded


@pytest.mark.parametrize("large", ["pq", "hnsw"])
def test_auto_index_switches_past_the_exact_limit(tmp_path: Path, embedder: SentenceEmbedder, large: str) -> None:
    settings = ReplaySettings(exact_max_rows=50, large_index=large, capacity=80, eviction="reservoir")
    buffer = ReplayBuffer(tmp_path, embedder, settings=settings)
    tickets = by_label(["card_arrival", "exchange_rate"], [50, 50])
    buffer.add_many(tickets[:40])
    assert buffer.index_state().kind == "flat"
    buffer.close_window()
    buffer.add_many(tickets[40:90])  # 90 rows, 10 evicted from the closed window: 80 > 50 rows
    assert buffer.index_state().kind == large and buffer.index_matches_rows() and len(buffer) == 80
    target = tickets[60]
    assert buffer.search(target.text, k=1)[0][0].id == target.id
    buffer.add_many(tickets[90:])  # 10 more evicted: approximate indexes keep tombstones
    assert len(buffer) == 80 and buffer.index_state().tombstones == 10
    assert len({r.id for r, _ in buffer.search("card", k=80)}) == 80  # search skips the tombstones
    buffer.close()
    reopened = ReplayBuffer(tmp_path, embedder, settings=settings)
    assert reopened.index_state()[::2] == (large, 10) and reopened.index_matches_rows()


def test_ivf_index_trains_from_the_rows_and_deletes(tmp_path: Path, embedder: SentenceEmbedder) -> None:
    settings = ReplaySettings(exact_max_rows=50, large_index="ivf", ivf_nprobe=4, capacity=90)
    buffer = ReplayBuffer(tmp_path, embedder, settings=settings)
    tickets = by_label(["card_arrival", "exchange_rate", "top_up_failed"], [40, 40, 40])
    buffer.add_many(tickets[:100])
    assert buffer.index_state().kind == "ivf" and buffer.index_matches_rows()
    assert buffer.search(tickets[70].text, k=1)[0][0].id == tickets[70].id
    buffer.close_window()
    buffer.add_many(tickets[100:])  # over capacity: evicted rows become tombstones, then a rebuild
    assert len(buffer) == 90 and buffer.index_matches_rows()
    assert {r.id for r, _ in buffer.search("card", k=90)} == {r.id for r in buffer.records([1, 2], probe=False)} | {
        r.id for r in buffer.records([1, 2], probe=True)}
    buffer.close()
    assert ReplayBuffer(tmp_path, embedder, settings=settings).index_matches_rows()


# -- properties of the policies (pure functions, so hypothesis can run many cases fast) -------
groups_strategy = st.lists(st.sampled_from("abcde"), min_size=0, max_size=60)


@settings(max_examples=200, deadline=None)
@given(groups=groups_strategy, k=st.integers(0, 80), seed=st.integers(0, 10))
def test_balanced_sample_invariants(groups: list[str], k: int, seed: int) -> None:
    picked = balanced_sample(groups, k, seed)
    assert len(picked) == min(k, len(groups))  # as many as asked, or all there are
    assert len(set(picked)) == len(picked)  # no row twice
    assert picked == balanced_sample(groups, k, seed)  # the seed decides
    taken = Counter(groups[p] for p in picked)
    available = Counter(groups)
    for group, n in taken.items():
        for other, m in taken.items():
            # A group is short of another only when it ran out of rows.
            assert n >= m - 1 or n == available[group], (group, other)


@settings(max_examples=200, deadline=None)
@given(groups=groups_strategy, n=st.integers(0, 80), data=st.data())
def test_eviction_invariants(groups: list[str], n: int, data: st.DataObject) -> None:
    keys = data.draw(st.lists(st.floats(0, 1, exclude_max=True), min_size=len(groups), max_size=len(groups)))
    victims = choose_victims(groups, keys, n)
    assert len(victims) == min(n, len(groups)) and len(set(victims)) == len(victims)
    kept = Counter(g for i, g in enumerate(groups) if i not in set(victims))
    before = Counter(groups)
    if kept:
        # Balanced: every group is either untouched (it was small) or cut to the common level.
        level = max(kept.values())
        assert all(kept[g] == before[g] or kept[g] >= level - 1 for g in before)
    for g in before:  # within a group, the lowest keys go first (reservoir order)
        gone = [keys[i] for i in victims if groups[i] == g]
        stay = [keys[i] for i in range(len(groups)) if groups[i] == g and i not in set(victims)]
        assert not gone or not stay or max(gone) <= min(stay)


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 40), keep=st.integers(1, 40))
def test_reservoir_keeps_the_largest_keys(n: int, keep: int) -> None:
    keys = list(np.random.default_rng(n).random(n))
    victims = set(choose_victims([0] * n, keys, max(n - keep, 0)))
    survivors = sorted(keys[i] for i in range(n) if i not in victims)
    assert survivors == sorted(keys)[max(n - keep, 0):]
