"""EWC holds what a window taught: its Fisher is measured per example, and under the penalty a
second window moves the first window's loss less than it does without it."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from learners.base_model import load_base
from learners.ewc import empirical_fisher
from learners.methods import warm_start
from learners.prompts import classification_example
from learners.train import answer_loss, collate, run_round
from learners.update_step import consolidate_window, initial_adapter
from tests.conftest import TINY_TRAIN


def test_the_fisher_counts_gradients_that_cancel_in_a_mean() -> None:
    # Two examples pulling one weight in opposite directions: their mean loss has no gradient,
    # yet the weight matters to each of them (squared gradient 4 apiece).
    layer = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(layer.weight)
    one = torch.ones((1, 1))

    def squared_error(model: nn.Module, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        return ((model(one.expand(len(targets["y"]), 1)) - targets["y"]) ** 2).mean()

    samples = [{"y": torch.tensor([[1.0]])}, {"y": torch.tensor([[-1.0]])}]
    assert empirical_fisher(layer, samples, squared_error)["weight"].item() == 4.0
    assert empirical_fisher(layer, [{"y": torch.tensor([[1.0], [-1.0]])}], squared_error)["weight"].item() == 0.0


def test_ewc_keeps_more_of_the_first_window_through_the_second(tiny_llama: Path, tmp_path: Path) -> None:
    base, tokenizer = load_base(tiny_llama)
    initial_adapter(tiny_llama, tmp_path, TINY_TRAIN.adapter, TINY_TRAIN.seed)
    model = warm_start(base, tmp_path)
    pad = tokenizer.pad_token_id

    def window(label: str, topic: str) -> list:
        return [classification_example(tokenizer, f"a question about my {topic} number {i}", label, 64)
                for i in range(8)]

    first, second = window("card_arrival", "card"), window("exchange_rate", "rate")
    run_round(model, first, [], TINY_TRAIN, pad)
    ewc = consolidate_window(model, first, None, TINY_TRAIN, pad)

    def first_window_loss(trained: nn.Module) -> float:
        trained.eval()
        with torch.no_grad():
            return answer_loss(trained, collate(first, pad)).item()

    learned = first_window_loss(model)
    plain, held = copy.deepcopy(model), copy.deepcopy(model)
    run_round(plain, second, [], TINY_TRAIN, pad)
    # The tiny model fits its window to a loss of ~0.015, where the Fisher is ~1e-7 a weight:
    # its penalty needs more weight to show than the default, which was sized on SmolLM2.
    ewc.strength = 1e7
    run_round(held, second, [], TINY_TRAIN, pad, ewc)
    forgot, kept = first_window_loss(plain) - learned, first_window_loss(held) - learned
    assert forgot > 1.0, (learned, forgot)  # the second window alone overwrites the first
    assert kept < forgot / 2, (forgot, kept)
