"""Keeping general ability while learning tickets: self-distillation on general text.

Ticket training moves the adapter towards one narrow format (`Ticket: ...\\nIntent: label`), and
the model's next-token distribution on everything else drifts with it: the canary check of the
gate (`learners.canary`) measures that drift. Rather than leaning on the gate's bound, each
training step adds the KL divergence from the base model's distribution (the adapter switched
off: no second model in memory) to the adapted one, on a few sentences of general text. These
are of the canary's kind, never its texts, so the canary stays an honest held-out test.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from peft import PeftModel
from torch import nn
from transformers import PreTrainedTokenizerBase

from learners.placement import device_of, to_device

GENERAL = (
    "The museum opens at nine in the morning and closes at five in the evening.",
    "Most plants need light, water and air to grow well.",
    "The train to the coast leaves every hour from the main station.",
    "She wrote a letter to her grandmother and posted it on Monday.",
    "A good night's sleep helps the body recover and the mind stay sharp.",
    "The river flows through the old town before it reaches the sea.",
    "Chess is a game for two players, each with sixteen pieces.",
    "Wind turbines turn the energy of moving air into electricity.",
    "The recipe calls for two eggs, a cup of milk and some sugar.",
    "Many birds fly south for the winter and return in the spring.",
    "The moon reflects the light of the sun and has no light of its own.",
    "He repaired the old bicycle and rode it to work the next day.",
    "Volcanoes form where molten rock rises through the crust of the Earth.",
    "The orchestra tuned their instruments before the concert began.",
    "A map shows roads, rivers and towns at a smaller scale.",
    "Children learn new words quickly when people read to them.",
    "The bakery on the corner sells fresh bread every morning.",
    "Glass is made by melting sand at a very high temperature.",
    "The football match ended in a draw after extra time.",
    "Honey bees collect nectar from flowers and turn it into honey.",
    "Rome was the capital of a large empire for many centuries.",
    "A thermometer measures how hot or cold something is.",
    "The committee will meet again next week to discuss the plan.",
    "Snow covered the mountains, and the roads were closed for a day.",
    "Computers store information as long sequences of ones and zeros.",
    "The gardener planted tulips along the path in the autumn.",
    "Light travels faster than sound, so we see lightning before we hear thunder.",
    "The novel tells the story of a family over three generations.",
    "Drinking enough water is important on a hot summer day.",
    "The ship carried grain, wood and wool across the ocean.",
    "An elephant can weigh as much as six tonnes.",
    "The students visited the observatory to look at the stars.",
)


def _padded(encoded: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded token ids, with their attention mask."""
    width = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        attention[row, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention}


def drift_from_base(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean per-token KL(base ‖ adapted) over the batch's real tokens; differentiable in the adapter.

    The base's distribution comes from the same model with its adapter switched off, under
    no_grad: one extra forward pass of a few short sentences per step.
    """
    if not isinstance(model, PeftModel):
        raise TypeError("distillation from the base needs a PEFT model (its adapter is switched off for the base)")
    batch = to_device(batch, device_of(model))
    with torch.no_grad(), model.disable_adapter():
        base = torch.log_softmax(model(**batch).logits.float(), dim=-1)
    adapted = torch.log_softmax(model(**batch).logits.float(), dim=-1)
    per_token = (base.exp() * (base - adapted)).sum(dim=-1)
    mask = batch["attention_mask"].float()
    return (per_token * mask).sum() / mask.sum()


class GeneralText:
    """Draws a few general sentences per step, reproducibly; tokenised once, not every step."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, pad_id: int, rows: int, seed: int) -> None:
        self.encoded = [tokenizer(text).input_ids for text in GENERAL]
        self.pad_id, self.rows = pad_id, rows
        self.rng = random.Random(seed)

    def batch(self) -> dict[str, torch.Tensor]:
        return _padded(self.rng.sample(self.encoded, self.rows), self.pad_id)
