"""Canary prompts: general text, unrelated to tickets, whose loss should not drift.

A rise in the mean per-token loss on these, against the base model, is general forgetting
that the probe sets (all about tickets) cannot see.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from learners.placement import device_of

BUILTIN = (
    "The capital of France is Paris, and the capital of Japan is Tokyo.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "Photosynthesis turns sunlight, water and carbon dioxide into sugar and oxygen.",
    "To make a cup of tea, boil water, add a tea bag and wait a few minutes.",
    "The Earth orbits the Sun once a year and turns on its axis once a day.",
    "Shakespeare wrote plays such as Hamlet, Macbeth and Romeo and Juliet.",
    "A triangle has three sides, and the angles of a triangle add up to 180 degrees.",
    "In Python, a list can be sorted with the built-in sorted function.",
    "The heart pumps blood through the arteries and veins of the body.",
    "Mount Everest is the highest mountain above sea level on Earth.",
    "Rain forms when water vapour in clouds condenses into droplets.",
    "The piano has eighty-eight keys, both black and white.",
    "Exercise, sleep and a balanced diet help people stay healthy.",
    "The Pacific is the largest and deepest ocean on the planet.",
    "A library lends books, and many also lend music and films.",
    "Bread is made from flour, water, salt and yeast.",
)


def load_canary(path: Path | None) -> list[str]:
    if path is None:
        return list(BUILTIN)
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@torch.inference_mode()
def canary_loss(model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> float:
    """Mean negative log-likelihood per predicted token over all texts."""
    total, tokens = 0.0, 0
    device = device_of(model)
    for text in texts:
        ids = torch.tensor([tokenizer(text).input_ids], device=device)
        if ids.shape[1] < 2:
            continue
        logits = model(input_ids=ids).logits[0, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        tokens += ids.shape[1] - 1
    return total / max(tokens, 1)
