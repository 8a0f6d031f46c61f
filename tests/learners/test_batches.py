"""How an update's batches mix the new window with replay (`learners.train.mixed_batches`)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from learners.config import TrainSettings
from learners.prompts import Example
from learners.train import mixed_batches


def intents(label: str, n: int) -> list[Example]:
    return [Example([i], [i], label) for i in range(n)]


def test_balanced_batches_give_every_label_an_equal_share() -> None:
    new = intents("new-a", 24) + intents("new-b", 24)
    replay = [e for label in ("old-a", "old-b", "old-c", "old-d", "old-e", "old-f") for e in intents(label, 24)]
    batches = mixed_batches(new, replay, TrainSettings(batch_size=16, epochs=2, step_budget=100),
                            random.Random(0))
    assert all(sum(e.intent.startswith("new") for e in b) == 4 for b in batches)  # 2 of 8 labels: 4 of 16
    seen = Counter(e.intent for b in batches for e in b)
    assert seen["new-a"] + seen["new-b"] == 2 * len(new)  # `epochs` passes over the new rows
    per_label = [seen[label] for label in seen]
    assert max(per_label) - min(per_label) <= 0.35 * min(per_label)  # replay draws are random


def test_a_fixed_share_and_a_late_window_keep_new_rows_in_every_batch() -> None:
    fixed = mixed_batches(intents("new", 32), intents("old", 32), TrainSettings(batch_size=16, replay_ratio=0.25),
                          random.Random(0))
    assert {sum(e.intent == "old" for e in b) for b in fixed} == {4}
    crowded = [e for i in range(76) for e in intents(f"old-{i}", 2)]  # 76 earlier labels, 1 new one
    late = mixed_batches(intents("new", 8), crowded, TrainSettings(batch_size=16, step_budget=100),
                         random.Random(0))
    assert all(sum(e.intent == "new" for e in b) == 1 for b in late) and len(late) == 8 * 3
    assert mixed_batches(intents("new", 8), [], TrainSettings(), random.Random(0))[0][0].intent == "new"


def test_the_step_budget_holds_an_update_to_the_same_cost_however_many_labels_came_before() -> None:
    new = intents("new-a", 40) + intents("new-b", 40)  # 80 rows, 3 epochs: 15 steps alone
    steps, passes = {}, {}
    for earlier in (2, 6, 40):
        replay = [e for i in range(earlier) for e in intents(f"old-{i}", 40)]
        batches = mixed_batches(new, replay, TrainSettings(batch_size=16, epochs=3, step_budget=2), random.Random(0))
        steps[earlier] = len(batches)
        passes[earlier] = sum(e.intent.startswith("new") for b in batches for e in b) / len(new)
    assert steps == {2: 30, 6: 30, 40: 30}  # balanced, without the budget: 30, 60, 240
    # Balanced, 2 of 42 labels would leave the new rows 1 row a batch, 0.4 passes; replay's share
    # stops at 12 of 16 rows, where the new rows still get `min_new_epochs` (1.5) passes.
    assert passes == {2: 3.0, 6: 1.5, 40: 1.5}


def test_min_new_epochs_is_bounded_by_epochs() -> None:
    with pytest.raises(ValueError, match="min_new_epochs"):
        TrainSettings(epochs=1, min_new_epochs=2)
