from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from learners.base_model import load_base
from learners.prompts import IGNORE, classification_example
from learners.scoring import LabelScorer

LABELS = ["card_arrival", "card", "exchange_rate", "lost_or_stolen_card", "top_up_by_cash_or_cheque"]


def naive_score(model: torch.nn.Module, tokenizer: object, text: str, label: str) -> float:
    example = classification_example(tokenizer, text, label, 256)  # type: ignore[arg-type]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([example.input_ids])).logits[0]
    targets = torch.tensor(example.labels[1:])
    logp = torch.log_softmax(logits[:-1], dim=-1)
    keep = targets != IGNORE
    return float(logp[keep].gather(1, targets[keep, None]).sum())


@pytest.mark.parametrize("text", ["where is my card", "x " * 200])
def test_cached_prefix_scores_equal_full_sequence_scores(tiny_llama: Path, text: str) -> None:
    base, tokenizer = load_base(tiny_llama)
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    scores = LabelScorer(tokenizer, LABELS, max_prompt_tokens=256).score(model, text)
    expected = torch.tensor([naive_score(model, tokenizer, text, label) for label in LABELS])
    assert torch.allclose(scores, expected, atol=1e-3)
    assert len(set(scores.tolist())) == len(LABELS)  # prefix labels ("card") are told apart


def test_batched_scores_equal_one_by_one(tiny_llama: Path) -> None:
    base, tokenizer = load_base(tiny_llama)
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    scorer = LabelScorer(tokenizer, LABELS, max_prompt_tokens=64)
    texts = ["where is my card", "x " * 100, "rate?", "my top up by cash failed twice this week"]
    batched = scorer.score_batch(model, texts)  # prompts of very different lengths, left-padded
    assert torch.allclose(batched, scorer.score_many(model, texts), atol=1e-3)
    assert scorer.score_batch(model, []).shape == (0, len(LABELS))
