"""How an update's batches mix the new window with replay (`learners.train.mixed_batches`), and how a
batch too large for one forward pass is taken in several (`learners.train.forward_passes`)."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from learners.base_model import load_base
from learners.config import AdapterSettings, TrainSettings
from learners.ewc import trainable
from learners.methods import warm_start
from learners.prompts import Example, classification_example
from learners.train import forward_passes, mixed_batches, run_round
from learners.update_step import initial_adapter
from tests.conftest import TINY_TRAIN

LABELS = ["card_arrival", "exchange_rate"]


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


def test_a_batch_split_into_forward_passes_takes_the_step_of_the_whole_batch(tiny_llama: Path,
                                                                           tmp_path: Path) -> None:
    """`train.max_batch_tokens` bounds a pass's memory, not what a step learns."""
    no_dropout = TINY_TRAIN.model_copy(update={"epochs": 2, "adapter": AdapterSettings(dropout=0.0)})
    initial_adapter(tiny_llama, tmp_path, no_dropout.adapter, no_dropout.seed)
    base, tokenizer = load_base(tiny_llama)
    examples = [classification_example(tokenizer, "my card " + "is late " * (i % 6) + str(i), LABELS[i % 2], 64)
                for i in range(16)]
    widest = max(len(e.input_ids) for e in examples)
    assert [len(p) for p in forward_passes(examples[:8], 8 * widest)] == [8]  # fits: one pass, in its order
    assert len(forward_passes(examples[:8], 2 * widest)) >= 4
    trained, reports = {}, {}
    for name, max_tokens in (("one pass", 8 * widest), ("passes of 2", 2 * widest)):
        model = warm_start(load_base(tiny_llama)[0], tmp_path)
        start = {k: v.detach().clone() for k, v in trainable(model).items()}
        cfg = no_dropout.model_copy(update={"max_batch_tokens": max_tokens})
        reports[name] = run_round(model, examples, [], cfg, tokenizer.pad_token_id)
        trained[name] = {k: v.detach().clone() for k, v in trainable(model).items()}
    assert reports["one pass"].steps == reports["passes of 2"].steps == 4
    assert reports["one pass"].tokens == reports["passes of 2"].tokens
    assert reports["one pass"].final_loss == pytest.approx(reports["passes of 2"].final_loss, rel=1e-4)
    assert any(not torch.equal(v, start[k]) for k, v in trained["one pass"].items())  # the steps moved it
    for key, weight in trained["one pass"].items():
        # Float sums in another order, through 4 Adam steps: equal to 5e-5 where each step moves a weight ~3e-3.
        torch.testing.assert_close(trained["passes of 2"][key], weight, rtol=1e-3, atol=5e-5)
