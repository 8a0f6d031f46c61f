"""One private round against its size (issue 17): which adapter learns under DP-SGD, and from how
many tickets.

The first window of `bench/cl.py`'s stream (BANKING77, or `--data`; seeded intents),
`--train-per-intent` tickets an intent, trained in one round from a fresh adapter and tested on the window's held-out
tickets. Per size:

- `base`: the fresh adapter untrained (the base model): what a run that learned nothing scores;
- `plain`: the product's update step without privacy (`learners.train.run_round`, the default
  adapter and learning rate): the baseline the ratios are against;
- `private`: DP-SGD (`learners.privacy.private_round`) in `train.privacy.adapter` at
  `train.privacy.learning_rate`;
- `private-default-adapter`: DP-SGD in the default adapter (`train.adapter`) at
  `train.learning_rate`, as private rounds trained before `train.privacy.adapter`.

σ is the one at which `--rounds` rounds of this size spend `--epsilon` at `--delta` (the service's
accountant), as a site's budget spread over a stream; a round samples `--batch-share` of its
tickets a step in expectation. The noise comes from the operating system, not the seed: a private
row differs run to run.

    evergreen bench private_round --train-per-intent 16,64,128    # SmolLM2-135M, about 40 min on 2 cores
    evergreen bench private_round --data stackoverflow --train-per-intent 600 --runs base,plain,private
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import torch

from bench.cl import PRESETS, fresh_adapter, make_stream, training_threads
from bench.federated import noise_for
from learners.base_model import resolve_base_model
from learners.config import TrainSettings
from learners.gate import evaluate
from learners.privacy import mechanism, private_round
from learners.prompts import examples_by_ticket, ticket_examples
from learners.scoring import LabelScorer
from learners.train import run_round
from streams.datasets import DATASETS
from streams.records import TicketRecord

RUNS = ("base", "plain", "private", "private-default-adapter")


def one_round(run: str, records: Sequence[TicketRecord], test: Sequence[TicketRecord], labels: list[str],
              base_path: Path, cfg: TrainSettings, args: argparse.Namespace) -> dict[str, object]:
    """Train a fresh adapter on `records` as `run` does; its accuracy on `test`, σ, steps, seconds."""
    if run != "plain":
        private = {"enabled": True, "delta": args.delta}
        if run == "private-default-adapter":
            private |= {"adapter": cfg.adapter, "learning_rate": cfg.learning_rate}
        cfg = cfg.model_copy(update={"batch_size": max(1, round(args.batch_share * len(records))),
                                     "privacy": cfg.privacy.model_copy(update=private)})
        sigma = noise_for(args.epsilon, lambda c: [mechanism(len(records), len(records), c)] * args.rounds, cfg,
                          args.delta)
        cfg = cfg.model_copy(update={"privacy": cfg.privacy.model_copy(update={"noise_multiplier": sigma})})
    with tempfile.TemporaryDirectory() as scratch:
        model, tokenizer = fresh_adapter(base_path, cfg, Path(scratch))
    started = time.perf_counter()
    if run == "base":
        report = None
    elif cfg.privacy.enabled:
        report = private_round(model, examples_by_ticket(tokenizer, records, cfg.max_length, cfg.system_prompt),  # type: ignore[arg-type]
                               [], cfg, tokenizer.pad_token_id)  # type: ignore[attr-defined]
    else:
        report = run_round(model, ticket_examples(tokenizer, records, cfg.max_length, cfg.system_prompt),  # type: ignore[arg-type]
                           [], cfg, tokenizer.pad_token_id)  # type: ignore[attr-defined]
    with torch.no_grad():
        accuracy = evaluate(model, LabelScorer(tokenizer, labels), {1: test})[1].accuracy  # type: ignore[arg-type]
    weights = sum(p.numel() for p in model.parameters() if p.requires_grad)
    noise = cfg.privacy.noise_multiplier if report and cfg.privacy.enabled else None
    return {"accuracy": accuracy, "noise_multiplier": noise,
            "batch_size": cfg.batch_size if report else None, "steps": report.steps if report else 0,
            "adapter_weights": weights, "learning_rate": None if report is None else
            cfg.privacy.learning_rate if cfg.privacy.enabled else cfg.learning_rate,
            "seconds": time.perf_counter() - started}


def markdown(results: list[dict[str, object]]) -> str:
    lines = ["| tickets | run | adapter weights | batch | σ | steps | accuracy | × plain |",
             "|---|---|---|---|---|---|---|---|"]
    plain = {r["tickets"]: r["accuracy"] for r in results if r["run"] == "plain"}
    for r in results:
        sigma = "–" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:.2f}"
        ratio = f"{r['accuracy'] / plain[r['tickets']]:.2f}" if plain.get(r["tickets"]) else "–"  # type: ignore[operator]
        lines.append(f"| {r['tickets']} | {r['run']} | {r['adapter_weights']:,} | {r['batch_size'] or '–'} | {sigma} | "
                     f"{r['steps']} | {r['accuracy']:.3f} | {ratio} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick", help="the stream's intents a window")
    parser.add_argument("--data", choices=sorted(DATASETS), default="banking77",
                        help="the data set (more tickets an intent than BANKING77's 117: stackoverflow's 600)")
    parser.add_argument("--train-per-intent", default="16,64,128", help="comma-separated round sizes, a column each")
    parser.add_argument("--base", default="smollm2-135m", help="base model (`model prepare` name or directory)")
    parser.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of " + ", ".join(RUNS))
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=4, help="rounds of this size the ε pays for")
    parser.add_argument("--delta", type=float, default=1e-6)
    parser.add_argument("--batch-share", type=float, default=1 / 3, help="expected batch, a share of the round")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-json", default="{}", help="TrainSettings overrides as JSON (default: none)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    cfg = TrainSettings.model_validate({**json.loads(args.train_json), "seed": args.seed})
    training_threads(cfg)
    cfg = cfg.model_copy(update={"ewc": cfg.ewc.model_copy(update={"enabled": False})})  # one window: nothing to keep
    base_path = resolve_base_model(args.base, Path.home() / ".cache" / "evergreen" / "models")
    runs = [r for r in RUNS if r in args.runs.split(",")]
    results: list[dict[str, object]] = []
    stem = args.out / (f"private-round-{args.preset}" if args.data == "banking77" else
                       f"private-round-{args.data}-{args.preset}")
    for size in (int(s) for s in args.train_per_intent.split(",")):
        stream = make_stream(replace(PRESETS[args.preset], train_per_intent=size), args.seed, args.data)
        records, labels = stream.train[0], sorted(stream.labels[0])
        for run in runs:
            result = {"tickets": len(records), "train_per_intent": size, "run": run,
                      **one_round(run, records, stream.test[0], labels, base_path, cfg, args)}
            results.append(result)
            print(f"{len(records):>5} tickets  {run:<24} {result['accuracy']:.3f}", flush=True)
            document = {"data": args.data, "preset": args.preset, "preset_sizes": asdict(PRESETS[args.preset]),
                        "base": args.base, "seed": args.seed, "epsilon": args.epsilon, "rounds": args.rounds,
                        "delta": args.delta, "batch_share": args.batch_share, "labels": labels,
                        "train": cfg.model_dump(mode="json"),
                        "command": "evergreen bench private_round " + " ".join(sys.argv[1:] if argv is None else argv),
                        "results": results}
            stem.parent.mkdir(parents=True, exist_ok=True)
            stem.with_suffix(".json").write_text(json.dumps(document, indent=2) + "\n")
            stem.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))
    print(f"wrote {stem}.json and .md")
    return document


if __name__ == "__main__":
    main()
