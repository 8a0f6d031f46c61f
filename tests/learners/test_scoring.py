from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model

from learners.base_model import load_base
from learners.config import AdapterSettings
from learners.methods import peft_config
from learners.prompts import IGNORE, classification_example, label_ids
from learners.scoring import LabelScorer, PromptPass

LABELS = ["card_arrival", "card", "exchange_rate", "lost_or_stolen_card", "top_up_by_cash_or_cheque"]
# Every method with weights away from its identity initialisation, so each one changes scores.
METHODS = {"lora": AdapterSettings(rank=4), "ia3": AdapterSettings(method="ia3"),
           "prefix": AdapterSettings(method="prefix", virtual_tokens=5)}


def naive_score(model: torch.nn.Module, tokenizer: object, text: str, label: str) -> float:
    """One full pass over prompt + label, positions from 0 as in training."""
    example = classification_example(tokenizer, text, label, 256)  # type: ignore[arg-type]
    ids = torch.tensor([example.input_ids])
    with torch.no_grad():
        logits = model(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None]).logits[0]
    targets = torch.tensor(example.labels[1:])
    logp = torch.log_softmax(logits[:-1], dim=-1)
    keep = targets != IGNORE
    return float(logp[keep].gather(1, targets[keep, None]).sum())


def adapted(tiny_llama: Path, cfg: AdapterSettings) -> PeftModel:
    base, _ = load_base(tiny_llama)
    torch.manual_seed(0)
    model = get_peft_model(base, peft_config(cfg))
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.3)
    return model.eval()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("text", ["where is my card", "x " * 200])
def test_cached_prefix_scores_equal_full_sequence_scores(tiny_llama: Path, text: str, method: str) -> None:
    model = adapted(tiny_llama, METHODS[method])
    tokenizer = load_base(tiny_llama)[1]
    scores = LabelScorer(tokenizer, LABELS, max_prompt_tokens=256).score(model, text)
    expected = torch.tensor([naive_score(model, tokenizer, text, label) for label in LABELS])
    assert torch.allclose(scores, expected, atol=1e-3)
    assert len(set(scores.tolist())) == len(LABELS)  # prefix labels ("card") are told apart
    with model.disable_adapter():  # the base model through the same wrapper (the gate's baseline)
        assert not torch.allclose(LabelScorer(tokenizer, LABELS).score(model, text), scores, atol=1e-3)


@pytest.mark.parametrize("method", METHODS)
def test_prompts_read_in_turns_and_labels_in_chunks_score_as_one_pass(tiny_llama: Path, method: str) -> None:
    """How the batcher shares the model (`service.batching`): the prompts a few columns per turn,
    then each label chunk against that one reading."""
    model = adapted(tiny_llama, METHODS[method])
    tokenizer = load_base(tiny_llama)[1]
    texts = ["where is my card", "x " * 100 + "my exchange rate"]
    whole = LabelScorer(tokenizer, LABELS).score_batch(model, texts)
    prompts = PromptPass(model, tokenizer, texts)
    while prompts.unread > 40:
        prompts.advance(40)
    chunks = [LabelScorer(tokenizer, LABELS[:2]), LabelScorer(tokenizer, LABELS[2:])]
    turns = torch.cat([chunk.score_after(prompts) for chunk in chunks], dim=1)
    assert prompts.ready and torch.allclose(turns, whole, atol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_batched_scores_equal_one_by_one(tiny_llama: Path, method: str) -> None:
    model = adapted(tiny_llama, METHODS[method])
    scorer = LabelScorer(load_base(tiny_llama)[1], LABELS, max_prompt_tokens=64)
    texts = ["where is my card", "x " * 100, "rate?", "my top up by cash failed twice this week"]
    batched = scorer.score_batch(model, texts)  # prompts of very different lengths, left-padded
    assert torch.allclose(batched, torch.stack([scorer.score(model, text) for text in texts]), atol=1e-3)
    assert torch.allclose(scorer.score_many(model, texts, batch=3), batched, atol=1e-3)
    assert scorer.score_batch(model, []).shape == (0, len(LABELS))



def test_150_labels_in_one_pass_score_as_full_sequences(tiny_llama: Path) -> None:
    model, tokenizer = load_base(tiny_llama)
    words = ["failed", "pending", "declined", "missing", "late", "twice", "blocked", "lost", "stolen", "expired",
             "wrong", "limit", "fee", "refund", "cancel", "change", "verify", "activate", "order", "delivery",
             "rate", "cash", "abroad", "online", "contactless"]
    labels = [f"{topic}_{word}" for topic in ("card", "top_up", "transfer", "pin", "exchange", "account")
              for word in words]
    scorer = LabelScorer(tokenizer, labels)
    assert len(labels) == 150
    fed = sum(len(label_ids(tokenizer, label)) - 1 for label in labels)
    assert len(scorer.trie.tokens) < fed  # shared prefixes ("card", "top up", …) run once
    texts = ["my card was declined abroad", "top up failed twice"]
    scores = scorer.score_batch(model.eval(), texts)
    assert scores.shape == (2, 150)
    for j in range(0, 150, 15):
        assert float(scores[1, j]) == pytest.approx(naive_score(model, tokenizer, texts[1], labels[j]), abs=1e-3)


@pytest.mark.parametrize("method", METHODS)
def test_a_shortlist_scores_its_labels_exactly_as_the_full_set_does(tiny_llama: Path, method: str) -> None:
    model = adapted(tiny_llama, METHODS[method])
    full = LabelScorer(load_base(tiny_llama)[1], LABELS, max_prompt_tokens=64)
    texts = ["where is my card", "x " * 100, "my top up by cash failed twice this week"]
    scores = full.score_batch(model, texts)
    for picked in (["card", "card_arrival"], ["top_up_by_cash_or_cheque", "exchange_rate", "card"]):
        short = full.subset(picked)
        assert short.labels == picked and len(short.trie.tokens) < len(full.trie.tokens)
        columns = [LABELS.index(label) for label in picked]
        assert torch.allclose(short.score_batch(model, texts), scores[:, columns], atol=1e-4)


def test_scores_among_shortlists_are_the_full_scores_of_each_tickets_own_labels(tiny_llama: Path) -> None:
    model = adapted(tiny_llama, METHODS["lora"])
    scorer = LabelScorer(load_base(tiny_llama)[1], LABELS, max_prompt_tokens=64)
    texts = ["where is my card", "x " * 100, "my top up by cash failed twice this week", "rate?"]
    shortlists = [["card", "card_arrival"], [], ["top_up_by_cash_or_cheque", "exchange_rate"], ["unknown", "card"]]
    full = scorer.score_many(model, texts)
    among = scorer.score_among(model, texts, shortlists, batch=2)  # batches mix unlike shortlists
    for row, short in enumerate(shortlists):
        own = [LABELS.index(label) for label in short if label in LABELS] or list(range(len(LABELS)))
        assert torch.allclose(among[row, own], full[row, own], atol=1e-4)
        assert torch.isinf(among[row, [c for c in range(len(LABELS)) if c not in own]]).all()
