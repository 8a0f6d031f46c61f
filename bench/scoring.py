"""Label scoring: the packed label trie (what serving and the gate use) against the plain batch,
and shortlisting (a ticket's neighbours' labels only) at 12 labels against 150.

Workload `trie` (default): the first N BANKING77 test tickets, each scored against all 77
intents, on the default base model: one ticket per pass, and 8 tickets per pass. Baseline,
measured in the same run: one forward over the batch of `prompt + label` sequences (every label
re-reads the prompt). Prints the speed-ups and checks all give the same scores; writes
bench/results/scoring.json.

Workload `shortlist`: a service (real uvicorn server, in this process) whose buffer holds the
CLINC150 training tickets, serving two versions with the base model's weights, one that has
learned 12 of the intents and one all 150. `/v1/classify` p50 with `serving.shortlist_labels`
on, 150 against 12 (alternating blocks), and with it off at 150 for reference; then top-1
accuracy on `--per-intent` CLINC150 test tickets per intent (zero-shot: the base model),
scoring every label against the shortlist, and the shortlist's recall (the true label in it),
at several sizes. Writes bench/results/shortlist.json.

Workload `among`: the gate's shortlisted scoring (`LabelScorer.score_among`) of `--tickets`
BANKING77 test tickets, each among the `--size` labels its nearest neighbours in a buffer of
`--train-per-intent` training tickets per intent vote for, 8 tickets a pass: each ticket with
its own labels' trie (the scorer's way) against, measured in the same run, the union of the
batch's shortlists in one shared trie (its way before). Checks both give the same scores;
writes bench/results/among.json.

    .venv/bin/python bench/scoring.py [--tickets 10] [--base smollm2-135m]
    nice -n 10 .venv/bin/python bench/scoring.py shortlist [--per-intent 4] [--size 12] [--neighbours 32]
    .venv/bin/python bench/scoring.py among [--tickets 64] [--train-per-intent 16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import torch
from serve import ADMIN, start_server, timed  # bench/ is the script's folder: its first import path

from learners.base_model import SMOLLM2, load_base, resolve_base_model
from learners.prompts import IGNORE, classification_example
from learners.scoring import LabelScorer
from learners.train import collate
from replay.buffer import ReplayBuffer
from replay.embed import SentenceEmbedder
from replay.shortlist import shortlist
from service.core import Service
from service.registry import ADAPTER_WEIGHTS, VersionMetadata
from service.settings import ApiSettings, ModelSettings, SchedulerSettings, ServingSettings, Settings
from streams.broker import free_port
from streams.datasets import load_tickets
from streams.records import TicketRecord

SIZES = (4, 8, 12, 16, 24)  # shortlist sizes whose recall and accuracy are reported besides `--size`


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


def trie_figures(args: argparse.Namespace) -> None:
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
    write(result, "scoring.json")
    print(f"{len(texts)} tickets × {len(labels)} labels: the packed trie is "
          f"{result['speedup_packed_vs_full']:.2f}× the batched full pass one ticket at a time, "
          f"{result['speedup_batched_vs_full']:.2f}× with 8 tickets per pass "
          f"(max score difference {result['max_abs_score_difference']:.2e}, same argmax: {result['same_argmax']})")


def write(result: dict[str, object], name: str) -> None:
    out = Path(__file__).parent / "results" / name
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


def labelled_version(service: Service, labels: Sequence[str]) -> str:
    """A version with the first version's weights (an untrained LoRA: the base model's answers)
    that has learned `labels`."""
    source = service.registry.path("v0000")
    with service.registry.draft() as draft:
        for name in ("adapter_config.json", ADAPTER_WEIGHTS):
            shutil.copy(source / name, draft.path / name)
        metadata = VersionMetadata(parent="v0000", verdict="accepted", windows_trained=[], labels=list(labels))
        return service.registry.publish(draft, metadata).name


def latency(service: Service, http: httpx.Client, versions: dict[str, str], texts: list[str],
            blocks: int) -> dict[str, list[float]]:
    """Seconds per `/v1/classify` answer under each version, in alternating blocks of the texts
    (load drift hits every case alike); `all-150` is the 150-label version with shortlisting off."""
    size = service.settings.serving.shortlist_labels
    times: dict[str, list[float]] = {case: [] for case in versions}
    for block in range(blocks):
        for case, version in versions.items():
            if service.registry.live != version:
                http.post(f"/v1/adapters/{version}/promote", headers=ADMIN).raise_for_status()
            service.settings.serving.shortlist_labels = 0 if case == "all-150" else size
            chunk = texts[block::blocks][: 2 if case == "all-150" else None]  # every label is slow: a few
            http.post("/v1/classify", json={"text": chunk[0]}).raise_for_status()  # warm-up after the swap
            times[case] += [timed(lambda t=text: http.post("/v1/classify", json={"text": t}).raise_for_status())
                            for text in chunk]
    service.settings.serving.shortlist_labels = size
    return times


def answer(row: torch.Tensor, labels: list[str], votes: list[tuple[str, float]], size: int) -> tuple[str, list[str]]:
    """The answer among a ticket's shortlist (all labels without one) and the shortlist, from its
    full scores `row`: a shortlisted label scores exactly as in the full pass."""
    own = shortlist(votes, labels, size) or labels
    return own[int(row[[labels.index(label) for label in own]].argmax())], own


def quality(scores: torch.Tensor, labels: list[str], tickets: list[TicketRecord],
            near: list[list[tuple[str, float]]], size: int) -> dict[str, float]:
    """Top-1 accuracy among each ticket's shortlist, how often the true label was in it, and the
    tickets the full pass got right and the shortlist wrong (`lost`) or the other way (`gained`).

    A ticket can be lost only when its label was not shortlisted (the shortlisted scores are the
    full pass's, so a true label that wins among all labels wins among the shortlist): for any
    model, the accuracy lost is at most the share of tickets whose label was missed, 1 − recall.
    """
    answers = [answer(row, labels, votes, size) for row, votes in zip(scores, near, strict=True)]
    full = [labels[int(i)] for i in scores.argmax(dim=1)]
    right = [(f == t.label, a == t.label) for f, (a, _), t in zip(full, answers, tickets, strict=True)]
    return {"accuracy": sum(a for _, a in right) / len(tickets),
            "recall": sum(t.label in own for (_, own), t in zip(answers, tickets, strict=True)) / len(tickets),
            "lost": sum(f and not a for f, a in right), "gained": sum(a and not f for f, a in right)}


def recall(labels: list[str], tickets: list[TicketRecord], near: list[list[tuple[str, float]]], size: int) -> float:
    """How often a ticket's label is in its shortlist (no language model needed: on every ticket)."""
    hits = sum(t.label in (shortlist(v, labels, size) or labels) for t, v in zip(tickets, near, strict=True))
    return hits / len(tickets)


def first_per_intent(records: list[TicketRecord], labels: list[str], n: int) -> list[TicketRecord]:
    """The first `n` records of each label, label by label."""
    by_label: dict[str, list[TicketRecord]] = {}
    for r in records:
        by_label.setdefault(r.label or "", []).append(r)
    return [r for label in labels for r in by_label.get(label, [])[:n]]


def shortlist_figures(args: argparse.Namespace) -> None:
    load_before = os.getloadavg()[0]
    train, test = load_tickets("clinc150", "train"), load_tickets("clinc150", "test")
    labels = sorted({t.label for t in train if t.label})
    if args.train_per_intent:  # a quick run
        train = first_per_intent(train, labels, args.train_per_intent)
    few = sorted(random.Random(0).sample(labels, 12))
    tickets = first_per_intent(test, labels, args.per_intent)
    random.Random(1).shuffle(tickets)  # the latency blocks see every kind of ticket
    texts = [t.text for t in tickets]
    port = free_port()
    with tempfile.TemporaryDirectory() as data:
        settings = Settings(data_dir=Path(data), model=ModelSettings(base=args.base),
                            scheduler=SchedulerSettings(enabled=False), api=ApiSettings(port=port),
                            serving=ServingSettings(shortlist_labels=args.size, shortlist_neighbours=args.neighbours))
        service = Service(settings)
        fill_s = timed(lambda: service.buffer.add_many(train))
        versions = {"12": labelled_version(service, few), "150": labelled_version(service, labels)}
        versions["all-150"] = versions["150"]
        server = start_server(service, port)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as http:
                times = latency(service, http, versions, texts[: args.latency_tickets], args.blocks)
                served = [http.post("/v1/classify", json={"text": t}).json() for t in texts[: args.latency_tickets]]
            model, tokenizer = service.runtime.model, service.runtime.tokenizer  # 150 labels live
            started = time.perf_counter()
            scores = LabelScorer(tokenizer, labels).score_many(model, texts)
            full_s = (time.perf_counter() - started) / len(texts)
            near = service.buffer.neighbour_labels(texts, args.neighbours)
            near_all = service.buffer.neighbour_labels([t.text for t in test], args.neighbours)
            neighbour_ms = statistics.median(
                timed(lambda t=t: service.buffer.neighbour_labels([t], args.neighbours)) * 1e3
                for t in texts[: args.latency_tickets])
            full = LabelScorer(tokenizer, labels)
            build_ms = statistics.median(timed(lambda v=v: full.subset(shortlist(v, labels, args.size))) * 1e3
                                         for v in near)
        finally:
            server.should_exit = True
            service.stop()

    p50 = {case: statistics.median(t) for case, t in times.items()}
    full_accuracy = float((scores.argmax(dim=1) == torch.tensor([labels.index(t.label) for t in tickets])).float()
                          .mean())
    by_size = {size: {**quality(scores, labels, tickets, near, size),
                      "recall_all_test": recall(labels, test, near_all, size)} for size in sorted({*SIZES, args.size})}
    agree = sum(a["label"] == answer(scores[i], labels, near[i], args.size)[0] for i, a in enumerate(served))
    result = {
        "benchmark": "label-shortlist", "base": args.base, "data": "clinc150", "train_tickets": len(train),
        "buffer_rows": len(train), "fill_seconds": fill_s, "test_tickets": len(tickets), "labels": len(labels),
        "size": args.size, "neighbours": args.neighbours, "threads": torch.get_num_threads(),
        "machine": platform.machine(), "load_average": [load_before, os.getloadavg()[0]],
        "p50_seconds": p50, "samples": {case: len(t) for case, t in times.items()},
        "p50_ratio_150_vs_12": p50["150"] / p50["12"], "p50_ratio_all_150_vs_12": p50["all-150"] / p50["12"],
        "accuracy_every_label": full_accuracy, "accuracy_shortlist": by_size[args.size]["accuracy"],
        "recall_shortlist": by_size[args.size]["recall"], "by_size": by_size,
        "served_answers_agreeing": f"{agree}/{len(served)}", "full_scoring_seconds_per_ticket": full_s,
        "shortlist_trie_build_ms_p50": build_ms, "neighbour_labels_ms_p50": neighbour_ms,
        "recall_all_test_tickets": by_size[args.size]["recall_all_test"], "all_test_tickets": len(test),
    }
    print(f"base {args.base}, CLINC150: {len(train)} training tickets in the buffer, {len(tickets)} test tickets, "
          f"shortlist {args.size} of {args.neighbours} neighbours; load {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after")
    print(f"  /v1/classify p50: 12 labels {p50['12'] * 1e3:.1f} ms, 150 shortlisted {p50['150'] * 1e3:.1f} ms "
          f"(ratio {result['p50_ratio_150_vs_12']:.3f}, target ≤ 1.2), 150 all {p50['all-150'] * 1e3:.1f} ms "
          f"(ratio {result['p50_ratio_all_150_vs_12']:.3f})")
    print(f"  top-1 accuracy (zero-shot base): every label {full_accuracy:.4f}, shortlist "
          f"{result['accuracy_shortlist']:.4f} (target within 0.005); recall {result['recall_shortlist']:.4f}; "
          f"served answers agreeing with the in-process shortlist: {agree}/{len(served)}")
    print(f"  one ticket's neighbours (embed + search + labels): p50 {neighbour_ms:.1f} ms; "
          f"a shortlist's trie built in {build_ms:.2f} ms")
    for size, f in by_size.items():
        print(f"  size {size:3d}: accuracy {f['accuracy']:.4f} (lost {f['lost']}, gained {f['gained']}), recall "
              f"{f['recall']:.4f}, on all {len(test)} test tickets {f['recall_all_test']:.4f}")
    write(result, "shortlist.json")


def union_scores(scorer: LabelScorer, model: torch.nn.Module, texts: list[str], shortlists: list[list[str]],
                 batch: int = 8) -> tuple[torch.Tensor, float]:
    """The way before: each batch scored among the union of its tickets' shortlists (batched by
    first label); the scores and the mean union size."""
    scores, unions = torch.full((len(texts), len(scorer.labels)), float("-inf")), []
    order = sorted(range(len(texts)), key=lambda i: scorer.labels.index(shortlists[i][0]))
    for start in range(0, len(order), batch):
        rows = order[start: start + batch]
        union = sorted({label for i in rows for label in shortlists[i]}, key=scorer.labels.index)
        unions.append(len(union))
        chunk = scorer.subset(union).score_batch(model, [texts[i] for i in rows])
        for at, i in enumerate(rows):
            scores[i, [scorer.labels.index(label) for label in shortlists[i]]] = \
                chunk[at, [union.index(label) for label in shortlists[i]]]
    return scores, statistics.fmean(unions)


def among_figures(args: argparse.Namespace) -> None:
    model, tokenizer = load_base(resolve_base_model(args.base, ModelSettings().cache_dir))
    train = load_tickets("banking77", "train")
    labels = sorted({t.label for t in train if t.label})
    per_intent = args.train_per_intent or 16
    test = random.Random(0).sample(load_tickets("banking77", "test"), args.tickets)
    texts = [t.text for t in test]
    with tempfile.TemporaryDirectory() as scratch:
        buffer = ReplayBuffer(Path(scratch), SentenceEmbedder())
        try:
            buffer.add_many(first_per_intent(train, labels, per_intent))
            near = buffer.neighbour_labels(texts, args.neighbours)
        finally:
            buffer.close()
    shortlists = [shortlist(v, labels, args.size) for v in near]
    scorer = LabelScorer(tokenizer, labels)
    scorer.score_among(model, texts[:8], shortlists[:8])  # warm-up
    started = time.perf_counter()
    own = scorer.score_among(model, texts, shortlists)
    own_s = time.perf_counter() - started
    started = time.perf_counter()
    union, union_size = union_scores(scorer, model, texts, shortlists)
    union_s = time.perf_counter() - started
    finite = torch.isfinite(union)
    result = {
        "benchmark": "shortlisted-scoring", "base": args.base, "tickets": len(texts), "labels": len(labels),
        "shortlist": args.size, "neighbours": args.neighbours, "buffer_per_intent": per_intent,
        "threads": torch.get_num_threads(), "machine": platform.machine(), "mean_union_labels": union_size,
        "own_trie_seconds_per_ticket": own_s / len(texts), "union_seconds_per_ticket": union_s / len(texts),
        "speedup_own_vs_union": union_s / own_s,
        "same_labels_scored": bool(torch.equal(finite, torch.isfinite(own))),
        "max_abs_score_difference": float((own[finite] - union[finite]).abs().max()),
    }
    write(result, "among.json")
    print(f"{len(texts)} tickets, each among {args.size} of {len(labels)} labels: its own trie "
          f"{result['own_trie_seconds_per_ticket']:.3f} s a ticket, the batch's union "
          f"({union_size:.1f} labels) {result['union_seconds_per_ticket']:.3f} s: "
          f"{result['speedup_own_vs_union']:.2f}x (max score difference {result['max_abs_score_difference']:.2e})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workload", nargs="?", choices=("trie", "shortlist", "among"), default="trie")
    parser.add_argument("--tickets", type=int, default=10, help="trie, among: BANKING77 test tickets")
    parser.add_argument("--base", default=SMOLLM2)
    parser.add_argument("--per-intent", type=int, default=4, help="shortlist: CLINC150 test tickets per intent")
    parser.add_argument("--size", type=int, default=ServingSettings().shortlist_labels)
    parser.add_argument("--neighbours", type=int, default=ServingSettings().shortlist_neighbours)
    parser.add_argument("--train-per-intent", type=int, default=0,
                        help="shortlist: buffer rows per intent (0: all); among: (0: 16)")
    parser.add_argument("--latency-tickets", type=int, default=48, help="shortlist: answers timed per case")
    parser.add_argument("--blocks", type=int, default=4, help="shortlist: alternating blocks per case")
    args = parser.parse_args()
    {"trie": trie_figures, "shortlist": shortlist_figures, "among": among_figures}[args.workload](args)


if __name__ == "__main__":
    main()
