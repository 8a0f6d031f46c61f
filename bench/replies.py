"""Replies learned from the stream: does the live model answer a ticket with its intent's macro?

No public ticket-to-reply corpus ships in the registries here, so every BANKING77 intent has a
support macro written for this project (`streams/replies/banking77.json`, one to three sentences
with the concrete steps), and each streamed ticket carries its intent's macro as its `reply`.
The stream is class-incremental and goes through the product's own update path (buffer,
`UpdateManager`, the worker, the gate with its reply checks, the registry), as `bench/suite.py`
runs it. After each window the live version answers held-out test tickets of every window so far
through the chat format (`learners.prompts.chat_ids`, greedy, as `/v1/chat/completions` with
temperature 0): per window, the share answered with their intent's macro (ROUGE-L F1 ≥ 0.8) and
the mean ROUGE-L. Methods as in the suite: `default`, `naive` (no replay, every update
promoted), `joint` (one update over every window). The base model's share before each update is
recorded too. Figures: the matrices, final share × joint, forgetting (share when learned minus
final). `--recurring` ends the default's stream with two windows of every streamed intent in
tickets it never carried: one with their macros (a healthy update), then one whose macros are
shifted by one intent (a macro export off by a row: the poisoned update the reply checks are
for); their gate checks are what the reply thresholds are chosen from. JSON to
`bench/results/replies-<preset>.json`, a heatmap to `docs/img/replies-<preset>.png`.

    evergreen bench replies -- --preset quick
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from statistics import fmean
from typing import Any

import torch
import transformers
from peft import PeftModel

from bench.suite import Loop, Preset, Stream, figures, make_stream, method_settings, summary, unstreamed
from learners.base_model import load_base, resolve_base_model
from learners.config import GateSettings, TrainSettings
from learners.replies import MATCH_ROUGE, greedy_reply, rouge_l
from replay.embed import SentenceEmbedder
from streams.datasets import load_replies
from streams.records import TicketRecord

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("default", "naive", "joint")
PRESETS = {
    "quick": Preset(windows=3, intents_per_window=3, per_intent=16, test_per_intent=3),  # 2 CPU cores
    "full": Preset(windows=6, intents_per_window=6, per_intent=40, test_per_intent=8),  # for a GPU
    "smoke": Preset(windows=2, intents_per_window=2, per_intent=10, test_per_intent=2),  # the tests' tiny model
}
Answered = dict[int, tuple[float, float]]  # window: (share matched, mean ROUGE-L)


def with_replies(rows: Sequence[TicketRecord], macros: dict[str, str]) -> list[TicketRecord]:
    return [r.model_copy(update={"reply": macros[r.label or ""]}) for r in rows]


def recurring_windows(stream: Stream, macros: dict[str, str], per_intent: int, seed: int
                      ) -> dict[str, list[TicketRecord]]:
    """Every streamed intent again in new tickets: `healthy` with its macro, `shifted` with the next
    intent's."""
    pool, rng = unstreamed(stream), random.Random(f"replies-recurring-{seed}")
    seen = [label for window in stream.labels for label in window]
    shifted = {label: macros[seen[(i + 1) % len(seen)]] for i, label in enumerate(seen)}
    windows = {"healthy": [r.model_copy(update={"reply": macros[label]})
                           for label in seen for r in pool[label][:per_intent]],
               "shifted": [r.model_copy(update={"reply": shifted[label]})
                           for label in seen for r in pool[label][per_intent:2 * per_intent]]}
    for rows in windows.values():
        rng.shuffle(rows)
    return windows


def answer_windows(base_path: Path, adapter: Path | None, tests: dict[int, list[TicketRecord]],
                   macros: dict[str, str], train: TrainSettings, max_tokens: int) -> Answered:
    """Each window's test tickets answered greedily by the adapter (None: the base model)."""
    model, tokenizer = load_base(base_path)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    scores: Answered = {}
    with torch.no_grad():
        for window, rows in tests.items():
            rouges = [rouge_l(greedy_reply(model, tokenizer, [{"role": "user", "content": r.text}],
                                           train.system_prompt, max_tokens), macros[r.label or ""])
                      for r in rows]
            scores[window] = (sum(x >= MATCH_ROUGE for x in rouges) / len(rouges), fmean(rouges))
    return scores


def run_method(method: str, stream: Stream, macros: dict[str, str], base_path: Path, embedder: SentenceEmbedder,
               train: TrainSettings, gate: GateSettings, log: Callable[[str], None],
               recurring: dict[str, list[TicketRecord]] | None = None) -> dict[str, Any]:
    train, gate = method_settings(method, train, gate)
    windows = [with_replies(rows, macros) for rows in stream.train]
    phases = [[r for w in windows for r in w]] if method == "joint" else windows
    matched: list[list[float | None]] = []
    rouge: list[list[float | None]] = []
    base: list[float] = []
    updates = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"bench-replies-{method}-") as scratch:
        loop = Loop(Path(scratch), base_path, embedder, train, gate)
        try:
            for phase, rows in enumerate(phases):
                seen = len(stream.labels) if method == "joint" else phase + 1
                tests = {w + 1: stream.test[w] for w in range(seen)}
                if method == "default":  # what not updating gives: the base model's answers
                    base.append(answer_windows(base_path, None, {seen: stream.test[phase]}, macros, train,
                                               gate.reply_max_tokens)[seen][0])
                record, cpu = loop.learn(rows)
                updates.append(summary(record, cpu))
                live = loop.registry.live
                assert live is not None
                now = answer_windows(base_path, loop.registry.path(live), tests, macros, train, gate.reply_max_tokens)
                matched.append([now[w + 1][0] if w + 1 in now else None for w in range(len(stream.labels))])
                rouge.append([now[w + 1][1] if w + 1 in now else None for w in range(len(stream.labels))])
                log(f"replies {method:<7} window {seen}: {record.status} ({record.reason}); live {live}: matched "
                    + " ".join(f"{now[w][0]:.2f}" for w in now) + ", ROUGE-L "
                    + " ".join(f"{now[w][1]:.2f}" for w in now))
            after = {}
            for name, rows in (recurring or {}).items():  # healthy first: the shifted one is judged against it
                record, cpu = loop.learn(rows)
                after[name] = summary(record, cpu)
                replies = "; ".join(f"{c['name']} {c['observed']:.3f} (p {c['p_value']})"
                                    for c in after[name]["checks"] if c["name"].startswith("reply"))
                log(f"replies {method:<7} recurring, {name} macros: {record.status} ({record.reason}); {replies}")
        finally:
            loop.close()
    return {"matched": matched, "rouge_l": rouge, "base_matched": base, "updates": updates, "recurring": after,
            "seconds": time.perf_counter() - started, **figures(matched),
            "final_rouge_l": fmean(a for a in rouge[-1] if a is not None)}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib  # the `bench` extra
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in METHODS if m in result["methods"]]
    fig, axes = plt.subplots(1, len(methods), figsize=(max(3.6 * len(methods), 7.0), 3.4), squeeze=False)
    for ax, method in zip(axes[0], methods, strict=True):
        matrix = [[float("nan") if a is None else a for a in row] for row in result["methods"][method]["matched"]]
        ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
        for i, row in enumerate(matrix):
            for j, a in enumerate(row):
                if a == a:
                    ax.text(j, i, f"{a:.2f}", ha="center", va="center", color="white" if a < 0.6 else "black")
        ax.set_title(method)
        ax.set_xlabel("window answered")
        ax.set_ylabel("after update")
        ax.set_xticks(range(len(matrix[0])), [str(j + 1) for j in range(len(matrix[0]))])
        ax.set_yticks(range(len(matrix)), [str(i + 1) for i in range(len(matrix))])
    fig.suptitle(f"bench replies ({result['preset']}): share of test tickets answered with their macro")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base", default="smollm2-135m", help="base model (`model prepare` name or directory)")
    parser.add_argument("--train-json", default="{}", help="TrainSettings overrides as JSON (default: none)")
    parser.add_argument("--gate-json", default="{}", help="GateSettings overrides as JSON (default: none)")
    parser.add_argument("--recurring", action="store_true",
                        help="end the default's stream with every intent again, with its macro, then shifted")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--plot", type=Path, help="PNG path (default: docs/img/replies-<preset>.png)")
    args = parser.parse_args(argv)
    transformers.utils.logging.disable_progress_bar()
    methods = args.methods.split(",")
    if unknown := set(methods) - set(METHODS):
        parser.error(f"unknown methods: {', '.join(sorted(unknown))}")
    preset = PRESETS[args.preset]
    train = TrainSettings.model_validate(json.loads(args.train_json))
    gate = GateSettings.model_validate(json.loads(args.gate_json))
    base_path = resolve_base_model(args.base, Path.home() / ".cache" / "evergreen" / "models")
    stream = make_stream("banking77", preset, args.seed)
    macros = load_replies("banking77")
    result: dict[str, Any] = {"preset": args.preset, "preset_sizes": asdict(preset), "base": args.base,
                              "command": "evergreen bench replies " + " ".join(sys.argv[1:] if argv is None else argv),
                              "train": train.model_dump(mode="json"), "gate": gate.model_dump(mode="json"),
                              "intents": stream.labels, "methods": {}}
    path = args.out / f"replies-{args.preset}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    embedder = SentenceEmbedder()
    for method in methods:
        recurring = (recurring_windows(stream, macros, preset.per_intent // 2, args.seed)
                     if args.recurring and method == "default" else None)
        result["methods"][method] = run_method(method, stream, macros, base_path, embedder, train, gate,
                                               lambda line: print(line, flush=True), recurring)
        path.write_text(json.dumps(result, indent=2) + "\n")  # after each method: a stopped run keeps its figures
    if "default" in methods and "joint" in methods:
        default, joint = result["methods"]["default"], result["methods"]["joint"]
        result["final_x_joint"] = default["final_accuracy"] / joint["final_accuracy"] if joint["final_accuracy"] \
            else None
    path.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.plot or ROOT / "docs" / "img" / f"replies-{args.preset}.png")
    for method, r in result["methods"].items():
        print(f"{method:<8} final matched {r['final_accuracy']:.3f}, ROUGE-L {r['final_rouge_l']:.3f}, "
              f"forgetting {r['forgetting']:+.3f}, when learned {r['when_learned']}, "
              f"promoted {sum(u['status'] == 'promoted' for u in r['updates'])}/{len(r['updates'])}")
    if "final_x_joint" in result:
        print(f"default final matched share x joint: {result['final_x_joint']}")
    return result


if __name__ == "__main__":
    main()
