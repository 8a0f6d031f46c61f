"""The label contrast trains the very scores the service classifies with, and lowers rivals."""

from __future__ import annotations

from pathlib import Path

import torch

from conftest import TINY_TRAIN
from learners.base_model import load_base
from learners.methods import warm_start
from learners.prompts import classification_example
from learners.scoring import LabelScorer
from learners.train import label_contrast, run_round
from learners.update import initial_adapter

LABELS = ["card_arrival", "card_payment_fee_charged", "reverted_card_payment"]
TICKETS = [("where is my new card", "card_arrival"), ("why was I charged a fee on my card", "card_payment_fee_charged"),
           ("a card payment came back to my account", "reverted_card_payment")]


def test_label_contrast_is_the_served_scores_cross_entropy(tiny_llama: Path, tmp_path: Path) -> None:
    initial_adapter(tiny_llama, tmp_path, TINY_TRAIN.adapter, TINY_TRAIN.seed)
    base, tokenizer = load_base(tiny_llama)
    model = warm_start(base, tmp_path).eval()
    scorer = LabelScorer(tokenizer, LABELS, max_prompt_tokens=64)
    examples = [classification_example(tokenizer, text, label, 64) for text, label in TICKETS]
    served = scorer.score_batch(model, [text for text, _ in TICKETS])
    expected = torch.nn.functional.cross_entropy(served, torch.tensor([LABELS.index(label) for _, label in TICKETS]))
    with torch.no_grad():
        assert torch.allclose(label_contrast(model, scorer, examples), expected, atol=1e-4)


def test_training_on_the_contrast_separates_labels_faster(tiny_llama: Path, tmp_path: Path) -> None:
    """The same three steps, with and without the contrast: the served labels' cross-entropy
    falls further with it (the answer loss alone also lowers it, more slowly)."""
    initial_adapter(tiny_llama, tmp_path, TINY_TRAIN.adapter, TINY_TRAIN.seed)
    after = {}
    for weight in (0.0, 1.0):
        base, tokenizer = load_base(tiny_llama)
        model = warm_start(base, tmp_path)
        scorer = LabelScorer(tokenizer, LABELS, max_prompt_tokens=64)
        examples = [classification_example(tokenizer, text, label, 64) for text, label in TICKETS] * 4
        cfg = TINY_TRAIN.model_copy(update={"label_contrast": weight, "epochs": 1.0, "batch_size": 4})
        run_round(model, examples, [], cfg, tokenizer.pad_token_id, scorer=scorer if weight else None)
        with torch.no_grad():
            after[weight] = label_contrast(model.eval(), scorer, examples).item()
    assert after[1.0] < 0.75 * after[0.0], after
