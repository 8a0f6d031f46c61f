"""Always on for months: what an update costs as the stream's history grows.

BANKING77's intents streamed class-incremental, 4 new intents a window (19 windows: 76 of the 77
intents), then a phase where old intents recur in tickets never streamed before (`--recur`
windows of 8 earlier intents each). Every window goes through the product's own update path
(`bench.suite.Loop`: the replay buffer and its probe split, `UpdateManager` with its worker
process and gate, the registry) with the service's default settings. For every update: wall
time split into snapshot, training, gate and the rest (worker start, model loads, saving the
candidate); optimiser steps; probes scored; the live version's accuracy on the held-out test
tickets (the data set's test split) of every intent seen so far, among all of them, as `/v1/classify`
answers them (with the buffer's vote; the model alone beside it); forgetting
(each class window's accuracy when a promoted update first learned it, minus now; a window no
promoted update has learned yet is not counted, its accuracy shows in the average); the gate's
verdict.

A few test tickets an intent keep that per-update scoring affordable, and make the forgetting
figure coarse: at 3 an intent, one ticket moves a window by 8 points, and the mean drop over 19
windows is uncertain by a few points. So forgetting is also measured on `wide_per_intent`
more test tickets an intent, scored only twice: when a promoted update first learns the window,
and with the last live version (`wide` in the JSON, the figure the target is held to).

That forgetting is split in two: what the last version lost among the labels known when each
window was learned, and what the intents learned since took from it (a window's close intents
arriving later). Before the stream, `vote_floor` measures the same drop for the buffer's vote
alone, a memory that forgets nothing and costs no model (`--vote-floor-only`: only that, a
minute; `--stream` streams another data set's intents).

Then `joint`: one update over every ticket of the stream at once, given the same total number
of optimiser steps as the whole stream took (the baseline the final accuracy is held to).

Targets (issue 21): the last update costs at most 1.5x the update at window 2; final average
accuracy >= 0.9x joint; forgetting <= 3 points at the end; every update promoted. Writes
bench/results/long-<preset>.json and the plot docs/img/long-<preset>.png (another stream or seed
adds its name to both).

    nice -n 10 .venv/bin/evergreen bench long -- --preset quick
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import fmean
from typing import Any

import transformers

from learners.base_model import resolve_base_model
from learners.config import GateSettings, TrainSettings
from learners.placement import CPU, Placement, place
from replay.buffer import ReplayBuffer
from replay.embed import SentenceEmbedder
from service.update_log import UpdateRecord
from streams.records import TicketRecord

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is a folder of scripts, not a package
from suite import Loop, Preset, Stream, accuracy, make_stream, tickets_by_label, unstreamed  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class LongPreset:
    stream: Preset
    recur_windows: int  # windows of earlier intents in new tickets, after the class-incremental ones
    recur_intents: int
    recur_per_intent: int
    wide_per_intent: int  # more test tickets an intent, for the forgetting figure only (above)


PRESETS = {
    # Sized for this 2-core CPU: fewer tickets per intent than a real stream.
    "quick": LongPreset(Preset(windows=19, intents_per_window=4, per_intent=16, test_per_intent=3), 3, 8, 8, 16),
    "full": LongPreset(Preset(windows=19, intents_per_window=4, per_intent=60, test_per_intent=20), 6, 8, 30, 20),
    "smoke": LongPreset(Preset(windows=3, intents_per_window=2, per_intent=10, test_per_intent=2), 1, 2, 4, 2),
}


def recurring_windows(stream: Stream, preset: LongPreset, seed: int) -> list[list[TicketRecord]]:
    """Windows of earlier intents, each ticket new to the stream."""
    rng = random.Random(f"recur-{seed}")
    pool = unstreamed(stream)
    seen = sorted(label for window in stream.labels for label in window)
    windows = []
    for _ in range(preset.recur_windows):
        intents = rng.sample(seen, preset.recur_intents)
        rows = [r for i in intents for r in pool[i][:preset.recur_per_intent]]
        for i in intents:
            pool[i] = pool[i][preset.recur_per_intent:]
        rng.shuffle(rows)
        windows.append(rows)
    return windows


def wide_tests(stream: Stream, preset: LongPreset) -> dict[int, list[TicketRecord]]:
    """Each class window's next `wide_per_intent` test tickets an intent, after the stream's own."""
    pool = tickets_by_label(stream.name, "test", "")
    start = preset.stream.test_per_intent
    return {w + 1: [r for i in intents for r in pool[i][start:start + preset.wide_per_intent]]
            for w, intents in enumerate(stream.labels)}


def costs(record: UpdateRecord, loop: Loop) -> dict[str, Any]:
    """One update's verdict, steps, probes scored and wall time split by phase."""
    total = (record.finished_at or time.time()) - record.started_at
    info = loop.registry.info(record.version) if record.version else None
    train = info.train.seconds if info and info.train else 0.0
    gate = record.gate.seconds if record.gate and record.gate.seconds else 0.0
    snapshot = record.snapshot_seconds or 0.0
    probes = sum(s.n for side in (record.gate.candidate, record.gate.live, record.gate.base)
                 for s in side.values()) if record.gate else 0
    return {"status": record.status, "reason": record.reason, "windows": record.windows,
            "steps": info.train.steps if info and info.train else None, "probes_scored": probes,
            "live_scores_reused": record.gate.live_scores_reused if record.gate else 0,
            "live_scores_computed": record.gate.live_scores_computed if record.gate else 0,
            "seconds": total, "snapshot_s": snapshot, "train_s": train, "gate_s": gate,
            "other_s": total - snapshot - train - gate}


def forgetting_since_learned(learned: dict[int, float], now: dict[int, float], promoted: bool,
                             trained: list[int]) -> float:
    """The mean drop of the class windows learned before this update, from their accuracy when
    learned to `now`; records in `learned` those this update learned, if it was promoted (a
    refused window is learned by the later update that retries it, and counts from there)."""
    drops = [learned[w] - now[w] for w in learned]
    if promoted:
        learned |= {w: now[w] for w in trained if w not in learned}
    return fmean(drops) if drops else 0.0


def run_stream(stream: Stream, recur: list[list[TicketRecord]], wide: dict[int, list[TicketRecord]],
               base_path: Path, embedder: SentenceEmbedder, train: TrainSettings, gate: GateSettings, log: Any,
               rows: list[dict[str, Any]], placement: Placement = CPU) -> dict[str, Any]:
    """The class windows, then the recurring ones; a row of figures per update, appended to
    `rows` as each update ends (`log` is called after it). Returns forgetting on the `wide` tests."""
    learned: dict[int, float] = {}  # each class window's accuracy when a promoted update learned it
    learned_wide: dict[int, float] = {}  # the same on its wide tests
    known_then: dict[int, list[str]] = {}  # the labels known when it was learned
    tests = {w + 1: stream.test[w] for w in range(len(stream.train))}
    with tempfile.TemporaryDirectory(prefix="bench-long-") as scratch:
        loop = Loop(Path(scratch), base_path, embedder, train, gate, placement=placement)
        try:
            for index, window in enumerate([*stream.train, *recur]):
                seen = min(index + 1, len(stream.train))
                record, _ = loop.learn(window)
                live = loop.registry.live
                assert live is not None
                labels = [label for w in stream.labels[:seen] for label in w]
                scored = accuracy(base_path, loop.registry.path(live), labels,
                                  {w: tests[w] for w in range(1, seen + 1)}, loop.buffer, placement)
                now = scored.served
                forgetting = forgetting_since_learned(learned, now, record.status == "promoted",
                                                      [w for w in record.windows if w in tests])
                if first := [w for w in learned if w not in learned_wide]:
                    learned_wide |= accuracy(base_path, loop.registry.path(live), labels,
                                             {w: wide[w] for w in first}, loop.buffer, placement).served
                    known_then |= dict.fromkeys(first, labels)
                row = {"window": index + 1, "recurring": index >= len(stream.train), **costs(record, loop),
                       "accuracy": now, "average_accuracy": fmean(now.values()),
                       "average_model_alone": fmean(scored.model_alone.values()),
                       "forgetting": forgetting}
                rows.append(row)
                log(f"window {index + 1:>2}{' (recurring)' if row['recurring'] else ''}: {record.status}, "
                    f"{row['seconds']:.0f} s (snapshot {row['snapshot_s']:.1f}, train {row['train_s']:.0f}, "
                    f"gate {row['gate_s']:.0f}, other {row['other_s']:.0f}), {row['steps']} steps, "
                    f"{row['probes_scored']} probes; accuracy {row['average_accuracy']:.3f}, "
                    f"forgetting {row['forgetting']:+.3f}"
                    + ("" if record.status == "promoted" else f" ({record.reason})"))
            labels = [label for w in stream.labels for label in w]
            final = accuracy(base_path, loop.registry.path(live), labels, {w: wide[w] for w in learned_wide},
                             loop.buffer, placement).served
            among_known = {w: accuracy(base_path, loop.registry.path(live), known_then[w], {w: wide[w]},
                                       loop.buffer, placement).served[w] for w in learned_wide}
        finally:
            loop.close()
    return {"tickets_per_intent": len(wide[1]) // len(stream.labels[0]), "learned": learned_wide, "final": final,
            "final_among_known": among_known, "forgetting": mean_drop(learned_wide, final),
            "lost_among_known": mean_drop(learned_wide, among_known),
            "taken_by_later_labels": mean_drop(among_known, final)}


def mean_drop(before: dict[int, float], after: dict[int, float]) -> float:
    """The mean over the windows of `before` of their drop to `after` (0 without windows).

    Forgetting is `mean_drop(learned, final)`; `run_stream` splits it in two: what the last version
    lost among the labels known when each window was learned, and what the labels learned since
    took from them.

    >>> learned, among_known, final = {1: 0.9, 2: 0.8}, {1: 0.8, 2: 0.9}, {1: 0.7, 2: 0.8}
    >>> [round(mean_drop(a, b), 3) for a, b in ((learned, final), (learned, among_known), (among_known, final))]
    [0.1, 0.0, 0.1]
    """
    return fmean(before[w] - after[w] for w in before) if before else 0.0


def vote_floor(stream: Stream, wide: dict[int, list[TicketRecord]], embedder: SentenceEmbedder) -> dict[str, Any]:
    """Forgetting as `run_stream` measures it, for a memory that forgets nothing: the buffer's vote
    alone (each ticket answered with the label of the largest share of its nearest stored tickets'
    votes, `ReplayBuffer.advise`; no vote: wrong). Each class window's wide tests are answered once
    its window is stored, among the labels known then, and after the last class window among all:
    what the intents that come later take where nothing is forgotten. No model runs: a minute."""
    def answered(buffer: ReplayBuffer, rows: list[TicketRecord], labels: list[str]) -> float:
        advice = buffer.advise([r.text for r in rows], labels, 0, 0)
        return fmean(bool(a.votes) and max(a.votes, key=a.votes.__getitem__) == r.label
                     for r, a in zip(rows, advice, strict=True))

    learned: dict[int, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-long-vote-") as scratch:
        buffer = ReplayBuffer(Path(scratch), embedder)
        try:
            for w, rows in enumerate(stream.train, 1):
                buffer.add_many(rows)
                learned[w] = answered(buffer, wide[w], [label for ws in stream.labels[:w] for label in ws])
            labels = [label for ws in stream.labels for label in ws]
            final = {w: answered(buffer, wide[w], labels) for w in learned}
        finally:
            buffer.close()
    return {"learned": learned, "final": final, "forgetting": mean_drop(learned, final)}


def run_joint(stream: Stream, recur: list[list[TicketRecord]], base_path: Path, embedder: SentenceEmbedder,
              train: TrainSettings, steps: int, placement: Placement = CPU) -> dict[str, Any]:
    """One update over every ticket, with `steps` optimiser steps (the stream's total)."""
    everything = [r for window in [*stream.train, *recur] for r in window]
    # An update of new rows only takes ceil(rows * epochs / batch) steps; the epochs are set
    # from the rows the buffer trains on (its probe split holds the rest out).
    with tempfile.TemporaryDirectory(prefix="bench-long-joint-") as scratch:
        loop = Loop(Path(scratch), base_path, embedder, train, GateSettings(), placement=placement)
        try:
            loop.buffer.add_many(everything)
            trained = len(loop.buffer.records([w.id for w in loop.buffer.windows()], probe=False))
            epochs = steps * train.batch_size / trained
            loop.updates.train = train.model_copy(update={"epochs": epochs})
            started = time.perf_counter()
            record, _ = loop.learn([])
            live = loop.registry.live
            assert live is not None
            labels = [label for w in stream.labels for label in w]
            scored = accuracy(base_path, loop.registry.path(live), labels,
                              {w + 1: stream.test[w] for w in range(len(stream.train))}, loop.buffer, placement)
            now = scored.served
            return {"status": record.status, "epochs": epochs, "steps": costs(record, loop)["steps"],
                    "seconds": time.perf_counter() - started, "accuracy": now,
                    "average_accuracy": fmean(now.values()),
                    "average_model_alone": fmean(scored.model_alone.values())}
        finally:
            loop.close()


def targets(result: dict[str, Any]) -> dict[str, bool]:
    updates = result["updates"]
    final = updates[-1]
    checks = {"last_update_le_1.5x_window_2": final["seconds"] <= 1.5 * updates[1]["seconds"],
              "forgetting_le_3_points": result.get("wide", final)["forgetting"] <= 0.03,
              "every_update_promoted": all(u["status"] == "promoted" for u in updates)}
    if "joint" in result:
        checks["final_ge_0.9_joint"] = final["average_accuracy"] >= 0.9 * result["joint"]["average_accuracy"]
    return checks


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    updates = result["updates"]
    x = [u["window"] for u in updates]
    fig, (cost, acc) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    bottom = [0.0] * len(x)
    for key, name in (("snapshot_s", "snapshot"), ("train_s", "training"), ("gate_s", "gate"),
                      ("other_s", "worker start, loads, save")):
        values = [u[key] for u in updates]
        cost.bar(x, values, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    cost.axhline(1.5 * updates[1]["seconds"], color="grey", linestyle="--", label="1.5 × window 2")
    cost.set_ylabel("update wall time (s)")
    cost.legend(fontsize=8, ncol=2)
    acc.plot(x, [u["average_accuracy"] for u in updates], marker="o", label="live version, seen intents")
    acc.plot(x, [u["forgetting"] for u in updates], marker=".", label="forgetting")
    if "joint" in result:
        acc.axhline(result["joint"]["average_accuracy"], color="grey", linestyle="--", label="joint, same steps")
    recurring = [u["window"] for u in updates if u["recurring"]]
    if recurring:
        acc.axvspan(min(recurring) - 0.5, max(recurring) + 0.5, color="0.9", label="old intents recur")
    acc.set_xlabel("window")
    acc.set_ylabel("accuracy")
    acc.set_ylim(-0.1, 1.05)
    acc.legend(fontsize=8)
    fig.suptitle(f"bench long ({result['preset']}): cost and accuracy over the stream")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stream", default="banking77", help="the data set whose intents are streamed")
    parser.add_argument("--vote-floor-only", action="store_true",
                        help="only the buffer's vote alone, without a model (`vote_floor`: a minute)")
    parser.add_argument("--base", default="smollm2-135m", help="base model (`model prepare` name or directory)")
    parser.add_argument("--no-joint", action="store_true", help="skip the joint baseline")
    parser.add_argument("--joint-only", action="store_true",
                        help="only the joint baseline, for the stream run whose result is in --out (its steps)")
    parser.add_argument("--train-json", default="{}", help="TrainSettings overrides as JSON")
    parser.add_argument("--gate-json", default="{}", help="GateSettings overrides as JSON")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (`model.device`)")
    parser.add_argument("--precision", default="float32", help="float32, bfloat16 or float16 (`model.precision`)")
    parser.add_argument("--plot", type=Path, help="PNG path (default: docs/img/long-<preset>.png)")
    args = parser.parse_args(argv)
    transformers.utils.logging.disable_progress_bar()
    preset = PRESETS[args.preset]
    train = TrainSettings.model_validate(json.loads(args.train_json))
    gate = GateSettings.model_validate(json.loads(args.gate_json))
    base_path = resolve_base_model(args.base, Path.home() / ".cache" / "evergreen" / "models")
    placement = place(args.device, args.precision, "--device", "--precision")
    embedder = SentenceEmbedder()
    stream = make_stream(args.stream, preset.stream, args.seed)
    recur = recurring_windows(stream, preset, args.seed)
    updates: list[dict[str, Any]] = []
    result: dict[str, Any] = {"preset": args.preset, "stream": args.stream, "seed": args.seed,
                              "sizes": asdict(preset), "base": args.base,
                              "command": "evergreen bench long " + " ".join(sys.argv[1:] if argv is None else argv),
                              "train": train.model_dump(mode="json"), "gate": gate.model_dump(mode="json"),
                              "placement": placement.model_dump(), "updates": updates}
    args.out.mkdir(parents=True, exist_ok=True)
    name = "-".join([f"long-{args.preset}", *([args.stream] if args.stream != "banking77" else []),
                     *([f"seed{args.seed}"] if args.seed else []), *(["vote-floor"] if args.vote_floor_only else [])])
    path = args.out / f"{name}.json"

    if args.joint_only:  # the stream's figures, settings and command are the earlier run's
        result = json.loads(path.read_text())
        updates = result["updates"]
        if (result["preset"], result["base"]) != (args.preset, args.base):
            parser.error(f"{path} is a run of {result['preset']} on {result['base']}")

    def log(line: str) -> None:  # and keep the figures so far, so a run that is stopped leaves them
        print(line, flush=True)
        path.write_text(json.dumps(result, indent=2) + "\n")

    if not args.joint_only:
        result["vote_floor"] = vote_floor(stream, wide_tests(stream, preset), embedder)
        log(f"forgetting of the buffer's vote alone, on the same tests: {result['vote_floor']['forgetting']:+.3f}")
        if args.vote_floor_only:
            return result
        result["wide"] = run_stream(stream, recur, wide_tests(stream, preset), base_path, embedder, train, gate,
                                    log, updates, placement)
        wide = result["wide"]
        log(f"forgetting on {wide['tickets_per_intent']} more test tickets an intent: {wide['forgetting']:+.3f} "
            f"(lost among the labels known when learned {wide['lost_among_known']:+.3f}, taken by later labels "
            f"{wide['taken_by_later_labels']:+.3f})")
    if not args.no_joint:
        steps = sum(u["steps"] or 0 for u in result["updates"])
        result["joint"] = run_joint(stream, recur, base_path, embedder, train, steps, placement)
        log(f"joint: {result['joint']['steps']} steps, accuracy {result['joint']['average_accuracy']:.3f}")
    result["cost_ratio_last_to_window_2"] = updates[-1]["seconds"] / updates[1]["seconds"]
    result["targets_met"] = targets(result)
    path.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.plot or ROOT / "docs" / "img" / f"{name}.png")
    log(f"last update / window 2: {result['cost_ratio_last_to_window_2']:.2f}x (target <= 1.5); "
        + ", ".join(f"{k}: {'met' if ok else 'MISSED'}" for k, ok in result["targets_met"].items()))
    return result


if __name__ == "__main__":
    main()
