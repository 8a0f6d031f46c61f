"""Federated benchmark (issue 17): the CL stream split across sites, with and without DP.

The stream is `bench/cl.py`'s (BANKING77, class-incremental, seeded), each window's training
tickets dealt to `--sites` sites unevenly: each intent of a window has a home site, which gets
`--skew` of its tickets, the others share the rest. Each site keeps its own replay of its own
earlier windows (`cl.replay_for` on its share). Configurations, all from the same fresh adapter:

- `base`: the untrained adapter (the base model), tested as the others: what a run learned is
  its accuracy above this;
- `centralized`: the CL benchmark's default method on the whole stream (`cl.run_method`);
- `federated`: per window, a round: every site trains the global adapter on its share of the
  window plus its replay (`learners.train.run_round`, the product's update step, at the learning
  rate times `--fit-lr-scale` as a site's fit is, `federation.fit_learning_rate_scale`), and the
  new global adapter is the average of the sites' adapters weighted by the tickets each trained
  on, as the hub's FedAvg takes it (`service.federation.hub`); `--server-lr` moves it further
  than the average (FedAvgM's server step, without momentum);
- `dp-eps-E`: the same rounds as DP-SGD (`learners.privacy.private_round`), each site's σ chosen
  so that its rounds over the whole stream spend ε = E at δ (`--delta`) by the service's own
  accountant (`learners.privacy.epsilon`), replayed tickets counted in every round they join.

Rounds run in this one process: the figures are the learning's, which the transport does not
change; the Flower hub's own path (signatures, quorum, the pooled gate) is tested on real
processes in tests/service/test_federation.py. No gate here, as in the CL benchmark: every round's
average is kept. After each window, the global adapter is tested on the held-out test tickets of
every window so far; figures as `bench/cl.py`'s, the accuracy-ε curve as a plot.

    evergreen bench federated --preset quick                           # SmolLM2-135M, 2 CPU cores
    evergreen bench federated --preset quick --train-per-intent 64     # the data size DP needs
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from bench.cl import (
    DEFAULT,
    PRESETS,
    Stream,
    figures,
    fresh_adapter,
    make_stream,
    replay_for,
    run_method,
    settings_for,
    training_threads,
)
from learners.accuracy_matrix import Row
from learners.base_model import resolve_base_model
from learners.config import TrainSettings
from learners.gate import evaluate
from learners.privacy import epsilon, mechanism, private_round
from learners.prompts import examples_by_ticket, ticket_examples
from learners.reports import PrivateRound
from learners.scoring import LabelScorer
from learners.train import run_round
from service.settings import FederationSettings
from streams.records import TicketRecord


def split(stream: Stream, sites: int, skew: float, seed: int) -> list[Stream]:
    """Each site's stream: every window's intents each sent mostly (`skew`) to a home site."""
    rng = random.Random(seed)
    shares: list[list[list[TicketRecord]]] = [[[] for _ in stream.train] for _ in range(sites)]
    for window, (labels, records) in enumerate(zip(stream.labels, stream.train, strict=True)):
        for record in records:
            home = (labels.index(record.label) + window) % sites
            others = [s for s in range(sites) if s != home]
            site = home if rng.random() < skew or not others else rng.choice(others)
            shares[site][window].append(record)
    return [Stream(labels=stream.labels, train=share, test=stream.test) for share in shares]


def site_plans(site: Stream, cfg: TrainSettings) -> list[PrivateRound]:
    """The private rounds a site runs along the stream (`learners.privacy.mechanism`)."""
    return [mechanism(len(records) + len(replay_for(site, w, cfg.seed)), len(records), cfg)
            for w, records in enumerate(site.train) if records]


def noise_for(target: float, plans: Callable[[TrainSettings], list[PrivateRound]], cfg: TrainSettings,
              delta: float) -> float:
    """The σ at which the rounds `plans` makes of `cfg` spend ε = `target` (bisection)."""
    def spent(sigma: float) -> float:
        return epsilon(plans(cfg.model_copy(update={"privacy": cfg.privacy.model_copy(
            update={"noise_multiplier": sigma})})), delta)

    low, high = 0.3, 256.0
    if spent(high) > target:
        raise ValueError(f"ε = {target} needs more noise than σ = {high}")
    for _ in range(40):
        middle = math.sqrt(low * high)
        low, high = (middle, high) if spent(middle) > target else (low, middle)
    return high


def run_federated(stream: Stream, sites: list[Stream], base_path: Path, cfg: TrainSettings,
                  target_epsilon: float | None, delta: float, log: str, server_lr: float = 1.0) -> dict[str, object]:
    """The rounds along the stream; accuracy rows, time, each site's σ and ε spent. The new global
    adapter moves `server_lr` times the way to the sites' average (1: FedAvg)."""
    private = cfg.model_copy(update={"privacy": cfg.privacy.model_copy(update={"enabled": True, "delta": delta})})
    with tempfile.TemporaryDirectory() as scratch:  # a private run's adapter is `train.privacy.adapter`
        model, tokenizer = fresh_adapter(base_path, private if target_epsilon is not None else cfg, Path(scratch))
    pad = tokenizer.pad_token_id  # type: ignore[attr-defined]
    configs = [private.model_copy(update={"privacy": private.privacy.model_copy(update={
        "noise_multiplier": noise_for(target_epsilon, lambda c, site=site: site_plans(site, c), cfg, delta)})})
        if target_epsilon is not None else cfg for site in sites]
    global_state = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}

    rows, started, plans = [], time.perf_counter(), [[] for _ in sites]
    for window in range(len(stream.train)):
        states, weights = [], []
        for index, (site, site_cfg) in enumerate(zip(sites, configs, strict=True)):  # none: the base model
            new_records = site.train[window]
            if not new_records:
                continue
            set_peft_model_state_dict(model, global_state)
            replay_records = replay_for(site, window, cfg.seed)
            if site_cfg.privacy.enabled:
                report = private_round(model, examples_by_ticket(tokenizer, new_records, cfg.max_length,  # type: ignore[arg-type]
                                                                 cfg.system_prompt),
                                       examples_by_ticket(tokenizer, replay_records, cfg.max_length,  # type: ignore[arg-type]
                                                          cfg.system_prompt), site_cfg, pad)
                assert report.privacy is not None
                plans[index].append(report.privacy)
            else:
                run_round(model, ticket_examples(tokenizer, new_records, cfg.max_length, cfg.system_prompt),  # type: ignore[arg-type]
                          ticket_examples(tokenizer, replay_records, cfg.max_length, cfg.system_prompt),  # type: ignore[arg-type]
                          site_cfg, pad)
            states.append({k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()})
            weights.append(len(new_records) + len(replay_records))
        if states:
            global_state = {k: v + server_lr * (sum(w * s[k] for w, s in zip(weights, states, strict=True))
                                                 / sum(weights) - v) for k, v in global_state.items()}
            set_peft_model_state_dict(model, global_state)
        learnt = list(range(window + 1))
        scorer = LabelScorer(tokenizer, sorted({label for w in learnt for label in stream.labels[w]}))  # type: ignore[arg-type]
        with torch.no_grad():
            scores = evaluate(model, scorer, {w + 1: stream.test[w] for w in learnt})
        rows.append(Row(f"after window {window + 1}", frozenset(w + 1 for w in learnt),
                        {w: s.accuracy for w, s in scores.items()}))
        print(f"{log:<12} after window {window + 1} ({len(states)} sites): "
              + " ".join(f"{s.accuracy:.2f}" for s in scores.values()), flush=True)
    return {"rows": rows, "seconds": time.perf_counter() - started,
            "noise_multipliers": [c.privacy.noise_multiplier if c.privacy.enabled else None for c in configs],
            "epsilon_spent": [epsilon(p, delta) if p else 0.0 for p in plans]}


def curve(results: dict[str, dict[str, object]], path: Path) -> None:
    """Final accuracy against ε, the centralized and non-private federated runs as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    private = sorted((r["target_epsilon"], r["average_accuracy"]) for r in results.values()
                     if r.get("target_epsilon") is not None)
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    if private:
        ax.plot(*zip(*private, strict=True), marker="o", label="federated, DP-SGD")
    for name, style in (("centralized", "--"), ("federated", ":")):
        if name in results:
            ax.axhline(results[name]["average_accuracy"], linestyle=style, color="grey", label=name)  # type: ignore[arg-type]
    ax.set_xscale("log")
    ax.set_xlabel("ε per site over the stream")
    ax.set_ylabel("final average accuracy")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(results: dict[str, dict[str, object]]) -> str:
    central = results.get("centralized", {}).get("average_accuracy")
    lines = ["| run | ε per site | σ per site | final avg accuracy | × centralized | avg forgetting | minutes |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        ratio = f"{r['average_accuracy'] / central:.2f}" if central else "–"  # type: ignore[operator]
        private = r.get("target_epsilon") is not None
        spent = ", ".join(f"{e:.2f}" for e in r["epsilon_spent"]) if private else "–"  # type: ignore[attr-defined]
        sigma = ", ".join(f"{s:.2f}" for s in r["noise_multipliers"]) if private else "–"  # type: ignore[attr-defined]
        lines.append(f"| {name} | {spent} | {sigma} | {r['average_accuracy']:.3f} | {ratio} | "
                     f"{r['average_forgetting']:.3f} | {r['seconds'] / 60:.1f} |")  # type: ignore[operator]
    return "\n".join(lines) + "\n"


def targets(results: dict[str, dict[str, object]]) -> dict[str, bool]:
    """The issue's claims, on this run's figures."""
    checks: dict[str, bool] = {}
    central, federated = results.get("centralized"), results.get("federated")
    if central and federated:
        checks["federated_ge_0.95_centralized"] = (
            federated["average_accuracy"] >= 0.95 * central["average_accuracy"])  # type: ignore[operator]
    if federated:
        checks["federated_forgetting_le_2_points"] = federated["average_forgetting"] <= 0.02  # type: ignore[operator]
    if central and "dp-eps-8" in results:
        checks["eps_8_within_5_points_of_centralized"] = (
            results["dp-eps-8"]["average_accuracy"] >= central["average_accuracy"] - 0.05)  # type: ignore[operator]
    return checks


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--train-per-intent", type=int, help="training tickets per intent (default: the preset's)")
    parser.add_argument("--base", default="smollm2-135m", help="base model (`model prepare` name or directory)")
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--skew", type=float, default=0.6, help="share of an intent's tickets at its home site")
    parser.add_argument("--epsilons", default="1,4,8", help="comma-separated ε per site (empty: no DP runs)")
    parser.add_argument("--delta", type=float, default=1e-6)
    parser.add_argument("--runs", default="base,centralized,federated,dp",
                        help="which of base, centralized, federated, dp")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fit-lr-scale", type=float, default=FederationSettings().fit_learning_rate_scale,
                        help="a site's fit trains at the learning rate times this "
                             "(`federation.fit_learning_rate_scale`)")
    parser.add_argument("--server-lr", type=float, default=1.0,
                        help="the global adapter moves this times the way to the sites' average (1: FedAvg)")
    parser.add_argument("--train-json", default="{}", help="TrainSettings overrides as JSON (default: none)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    if args.train_per_intent:
        preset = replace(preset, train_per_intent=args.train_per_intent)
    cfg = settings_for(DEFAULT, TrainSettings.model_validate({**json.loads(args.train_json), "seed": args.seed}))
    training_threads(cfg)
    fit_cfg = FederationSettings(fit_learning_rate_scale=args.fit_lr_scale).fit_train(cfg)
    base_path = resolve_base_model(args.base, Path.home() / ".cache" / "evergreen" / "models")
    stream = make_stream(preset, args.seed)
    sites = split(stream, args.sites, args.skew, args.seed)
    runs = set(args.runs.split(","))
    smallest = min(len(s.train[0]) for s in sites)
    print(f"BANKING77 class-incremental, {preset.windows} windows x {preset.intents_per_window} intents, "
          f"{sum(map(len, stream.train))} training tickets over {args.sites} sites "
          f"({', '.join(str(sum(map(len, s.train))) for s in sites)}), skew {args.skew}, base {args.base}")
    if 1 / args.delta <= sum(map(len, stream.train)):
        parser.error(f"--delta {args.delta} is not below 1 / the {sum(map(len, stream.train))} tickets")
    results: dict[str, dict[str, object]] = {}
    stem = args.out / f"federated-{args.preset}" if not args.train_per_intent else \
        args.out / f"federated-{args.preset}-{args.train_per_intent}"
    document: dict[str, object] = {}

    def record(name: str, run: dict[str, object], **extra: object) -> None:
        nonlocal document
        results[name] = {**figures(run.pop("rows")), **run, **extra}  # type: ignore[arg-type]
        document = write(stem, results, {
            "preset": args.preset, "preset_sizes": asdict(preset), "base": args.base, "seed": args.seed,
            "sites": args.sites, "skew": args.skew, "fit_lr_scale": args.fit_lr_scale, "server_lr": args.server_lr,
            "delta": args.delta, "smallest_site_window": smallest,
            "site_tickets": [[len(w) for w in s.train] for s in sites], "windows": stream.labels,
            "train": cfg.model_dump(mode="json"),
            "command": "evergreen bench federated " + " ".join(sys.argv[1:] if argv is None else argv)})

    if "base" in runs:
        record("base", run_federated(stream, [], base_path, cfg, None, args.delta, "base"))
    if "centralized" in runs:
        record("centralized", run_method(DEFAULT, stream, base_path, cfg,
                                         lambda m, line: print(f"{'centralized':<12} {line}", flush=True)))
    if "federated" in runs:
        record("federated", run_federated(stream, sites, base_path, fit_cfg, None, args.delta, "federated",
                                          args.server_lr))
    if "dp" in runs:
        for target in [float(e) for e in args.epsilons.split(",") if e]:
            name = f"dp-eps-{target:g}"
            record(name, run_federated(stream, sites, base_path, fit_cfg, target, args.delta, name,
                                       args.server_lr),
                   target_epsilon=target)
    print(markdown(results))
    for name, ok in document.get("targets_met", {}).items():  # type: ignore[attr-defined]
        print(f"{name:<40} {'met' if ok else 'MISSED'}")
    print(f"wrote {stem}.json, .md and -epsilon.png")
    return document


def write(stem: Path, results: dict[str, dict[str, object]], about: dict[str, object]) -> dict[str, object]:
    stem.parent.mkdir(parents=True, exist_ok=True)
    document = {**about, "results": results, "targets_met": targets(results)}
    stem.with_suffix(".json").write_text(json.dumps(document, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(results))
    curve(results, stem.with_name(f"{stem.name}-epsilon.png"))
    return document


if __name__ == "__main__":
    main()
