"""Self-distillation on general text keeps the model's general distribution near the base's
while it learns tickets, measured on the canary (whose texts it never sees)."""

from __future__ import annotations

from pathlib import Path

import torch

from learners.base_model import load_base
from learners.canary import BUILTIN, canary_loss
from learners.general import GENERAL, GeneralText, drift_from_base
from learners.methods import warm_start
from learners.prompts import classification_example
from learners.train import run_round
from learners.update_step import initial_adapter
from tests.conftest import TINY_TRAIN


def test_general_text_is_not_the_canary() -> None:
    assert not set(GENERAL) & set(BUILTIN)


def test_distillation_keeps_canary_loss_near_the_base(tiny_llama: Path, tmp_path: Path) -> None:
    initial_adapter(tiny_llama, tmp_path, TINY_TRAIN.adapter, TINY_TRAIN.seed)
    drift = {}
    for weight in (0.0, 1.0):
        base, tokenizer = load_base(tiny_llama)
        model = warm_start(base, tmp_path)
        pad = tokenizer.pad_token_id
        window = [classification_example(tokenizer, f"a question about my card number {i}", "card_arrival", 64)
                  for i in range(16)]
        cfg = TINY_TRAIN.model_copy(update={"keep_general": weight, "general_rows": 4})
        general = GeneralText(tokenizer, pad, cfg.general_rows, cfg.seed) if weight else None
        with torch.no_grad(), model.disable_adapter():
            before = canary_loss(model, tokenizer, BUILTIN)
        with torch.no_grad():  # LoRA starts with B = 0: the adapted model is the base
            assert drift_from_base(model, GeneralText(tokenizer, pad, 4, seed=0).batch()).item() == 0.0
        run_round(model, window, [], cfg, pad, general=general)
        model.eval()
        drift[weight] = canary_loss(model, tokenizer, BUILTIN) - before
    # 30 epochs of one label move the tiny model's canary loss (measured: +0.11 nats/token);
    # distillation keeps it within half of that (measured: -0.03).
    assert drift[0.0] > 0.05 and abs(drift[1.0]) < drift[0.0] / 2, drift
