"""Label scoring: the packed label trie (what serving and the gate use) against the plain batch.

Workload: the first N BANKING77 test tickets, each scored against all 77 intents, on the
default base model: one ticket per pass, and 8 tickets per pass. Baseline, measured in the same
run: one forward over the batch of `prompt + label` sequences (every label re-reads the
prompt). Prints the speed-ups and checks all give the same scores; writes
bench/results/scoring.json.

    .venv/bin/python bench/scoring.py [--tickets 10] [--base smollm2-135m]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from learners.base_model import SMOLLM2, load_base, resolve_base_model
from learners.prompts import IGNORE, classification_example
from learners.scoring import LabelScorer
from learners.train import collate
from service.settings import ModelSettings
from streams.datasets import load_tickets


@torch.inference_mode()
def batched_full_scores(model: torch.nn.Module, tokenizer: object, text: str, labels: list[str]) -> torch.Tensor:
    examples = [classification_example(tokenizer, text, label, 512) for label in labels]  # type: ignore[arg-type]
    batch = collate(examples, tokenizer.pad_token_id)  # type: ignore[attr-defined]
    logp = torch.log_softmax(model(input_ids=batch["input_ids"],
                                   attention_mask=batch["attention_mask"]).logits[:, :-1], dim=-1)
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    picked = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return (picked * keep).sum(dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tickets", type=int, default=10)
    parser.add_argument("--base", default=SMOLLM2)
    args = parser.parse_args()
    model, tokenizer = load_base(resolve_base_model(args.base, ModelSettings().cache_dir))
    test = load_tickets("banking77", "test")
    labels = sorted({t.label for t in test if t.label})
    texts = [t.text for t in test[: args.tickets]]
    scorer = LabelScorer(tokenizer, labels)
    scorer.score(model, texts[0])  # warm-up of both paths
    batched_full_scores(model, tokenizer, texts[0], labels)

    started = time.perf_counter()
    packed = torch.stack([scorer.score(model, t) for t in texts])
    packed_s = time.perf_counter() - started
    started = time.perf_counter()
    batched = scorer.score_many(model, texts, batch=8)
    batched_s = time.perf_counter() - started
    started = time.perf_counter()
    full = torch.stack([batched_full_scores(model, tokenizer, t, labels) for t in texts])
    full_s = time.perf_counter() - started

    result = {
        "benchmark": "label-scoring", "base": args.base, "tickets": len(texts), "labels": len(labels),
        "threads": torch.get_num_threads(), "machine": platform.machine(),
        "packed_seconds_per_ticket": packed_s / len(texts), "batched_seconds_per_ticket": batched_s / len(texts),
        "full_seconds_per_ticket": full_s / len(texts),
        "speedup_packed_vs_full": full_s / packed_s, "speedup_batched_vs_full": full_s / batched_s,
        "max_abs_score_difference": float(max((packed - full).abs().max(), (batched - full).abs().max())),
        "same_argmax": bool((packed.argmax(1) == full.argmax(1)).all() and (batched.argmax(1) == full.argmax(1)).all()),
    }
    out = Path(__file__).parent / "results" / "scoring.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{len(texts)} tickets × {len(labels)} labels: the packed trie is "
          f"{result['speedup_packed_vs_full']:.2f}× the batched full pass one ticket at a time, "
          f"{result['speedup_batched_vs_full']:.2f}× with 8 tickets per pass "
          f"(max score difference {result['max_abs_score_difference']:.2e}, same argmax: {result['same_argmax']})")


if __name__ == "__main__":
    main()
