"""The suite's tables, from a run or from the JSON documents of several (`evergreen bench suite_report`).

Runs of the suite on different streams, seeds or days are merged into one table of streams and
one of the gate's checks: each check's observed values over the healthy updates of every stream
against those on the scrambled windows and on naive's updates (no replay: what forgetting looks
like), and its bound. A bound is chosen where the healthy updates' values end and the harmful
ones' begin; one stream cannot show where that is.

    evergreen bench suite_report bench/results/suite-quick.json other-run/suite-quick.json

With `--against BASELINE.json`, each stream's final served answers are set against the
baseline's on the same test tickets (the streams are reproducible from their name and seed):
tickets lost and gained, and exact McNemar p-values of "worse" and of "better", so "within noise"
is a test, not a reading of two averages.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from statistics import fmean
from typing import Any

from learners.stats import paired_regression

# What a check was applied to: the default's healthy updates, its scrambled windows, naive's updates.
KINDS = ("healthy", "scrambled", "naive")
# Observed values of one check over the updates of each kind, and whether it passed.
Spread = dict[str, dict[str, list[tuple[float, bool]]]]


def targets(result: dict[str, Any]) -> dict[str, bool]:
    """The issue's targets on one stream's figures."""
    default = result["default"]
    checks = {"forgetting_le_2_points": default["forgetting"] <= 0.02,
              "every_window_at_least_zero_shot": all(
                  learned >= base for learned, base in zip(default["when_learned"], default["base_zero_shot"],
                                                           strict=False)),
              "every_healthy_update_promoted": all(u["status"] == "promoted" for u in default["updates"]
                                                   if not u.get("poisoned"))}
    if "joint" in result:
        checks["final_ge_0.95_joint"] = default["final_accuracy"] >= 0.95 * result["joint"]["final_accuracy"]
    if any(u.get("poisoned") for u in default["updates"]):
        checks["poisoned_update_rejected"] = all(u["status"] == "rejected" for u in default["updates"]
                                                 if u.get("poisoned"))
    return checks


def markdown(results: dict[str, dict[str, Any]]) -> str:
    lines = ["| stream | zero-shot base | when learned | naive final, forgetting | default final | × joint | "
             "forgetting | among the labels known then | model alone: final, forgetting | promoted | "
             "scrambled window | minutes | default's update CPU minutes |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        d = r["default"]
        healthy = [u for u in d["updates"] if not u.get("poisoned")]
        poisoned = [u for u in d["updates"] if u.get("poisoned")]
        joint = r.get("joint", {}).get("final_accuracy")
        naive = r.get("naive")
        lines.append(
            f"| {name} | {' '.join(f'{a:.2f}' for a in d['base_zero_shot'])} | "
            f"{' '.join(f'{a:.2f}' for a in d['when_learned'])} | "
            + (f"{naive['final_accuracy']:.3f}, {naive['forgetting']:+.3f} | " if naive else "– | ")
            + f"{d['final_accuracy']:.3f} | " + (f"{d['final_accuracy'] / joint:.2f}" if joint else "–")
            + f" | {d['forgetting']:+.3f} | {d['forgetting_among_known']:+.3f}"
            + f" | {d['model_alone']['final_accuracy']:.3f}, {d['model_alone']['forgetting']:+.3f}"
            + f" | {sum(u['status'] == 'promoted' for u in healthy)}/{len(healthy)} | "
            + (poisoned[0]["status"] if poisoned else "–")
            + f" | {sum(m['seconds'] for k, m in r.items() if k != 'targets_met') / 60:.1f}"
            + f" | {sum(u['cpu_seconds'] for u in healthy) / 60:.1f} |")
    return "\n".join(lines) + "\n"


def paired_markdown(results: dict[str, dict[str, Any]], baseline: dict[str, dict[str, Any]]) -> str:
    """Each stream's final served answers against the baseline's default on the same tickets."""
    lines = ["| stream | final | baseline's | tickets lost | gained | p (worse) | p (better) |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        ours, theirs = r["default"].get("final_correct"), baseline.get(name, {}).get("default", {}).get("final_correct")
        if not ours or not theirs:
            continue
        if ours.keys() != theirs.keys() or any(len(ours[w]) != len(theirs[w]) for w in ours):
            raise ValueError(f"{name}: not the same test tickets as the baseline's (another preset?)")
        after = [c == "1" for w in sorted(ours, key=int) for c in ours[w]]
        before = [c == "1" for w in sorted(ours, key=int) for c in theirs[w]]
        worse, better = paired_regression(before, after), paired_regression(after, before)
        lines.append(f"| {name} | {fmean(after):.3f} | {fmean(before):.3f} | {worse.lost} | {worse.gained} | "
                     f"{worse.p_value:.3f} | {better.p_value:.3f} |")
    return "\n".join(lines) + "\n"


def check_spread(results: dict[str, dict[str, Any]]) -> tuple[Spread, dict[str, set[float]]]:
    """Every gate check, by check (one row for all "drop on window N"): (observed, passed) on the
    default's healthy and scrambled updates and on naive's, and the check's bounds (the learning
    check's is chance, which differs from update to update). Naive's candidates are promoted
    whatever their checks say, so its bounds are not the default's and are left out.

    >>> update = {"checks": [
    ...     {"name": "drop on window 1", "observed": 0.1, "passed": True, "threshold": 0.05},
    ...     {"name": "drop on window 2", "observed": 0.2, "passed": False, "threshold": 0.05}]}
    >>> naive = {"checks": [{"name": "drop on window 1", "observed": 0.9, "passed": True, "threshold": 1}]}
    >>> spread, bounds = check_spread({"s": {"default": {"updates": [update]}, "naive": {"updates": [naive]}}})
    >>> spread["drop on window N"]["healthy"], spread["drop on window N"]["naive"], bounds["drop on window N"]
    ([(0.1, True), (0.2, False)], [(0.9, True)], {0.05})
    """
    spread: Spread = defaultdict(lambda: {kind: [] for kind in KINDS})
    bounds: dict[str, set[float]] = defaultdict(set)
    for result in results.values():
        updates = [(u, "scrambled" if u.get("poisoned") else "healthy") for u in result["default"]["updates"]]
        updates += [(u, "naive") for u in result.get("naive", {}).get("updates", [])]
        for update, kind in updates:
            for check in update["checks"]:
                name = re.sub(r"window \d+", "window N", check["name"])
                spread[name][kind].append((check["observed"], check["passed"]))
                if kind != "naive":
                    bounds[name].add(check["threshold"] + 0.0)  # -0.0 (a gain of 0) prints as 0
    return spread, bounds


def spread_markdown(results: dict[str, dict[str, Any]]) -> str:
    """The check spread as a table: where each bound sits against healthy, scrambled and naive updates.
    Naive's gate passes everything, so its column counts the values past the default's bound."""
    spread, bounds = check_spread(results)

    def values(pairs: list[tuple[float, bool]], bound: float | None = None) -> str:
        """n, min … median … max, then how many failed, or (given `bound`) how many lie past it."""
        if not pairs:
            return "–"
        observed = sorted(v for v, _ in pairs)
        summary = f"{len(pairs)}: {observed[0]:.3f} … {observed[len(observed) // 2]:.3f} … {observed[-1]:.3f}"
        if bound is not None:
            return summary + f", {sum(v > bound for v in observed)} past the bound"
        failed = sum(not ok for _, ok in pairs)
        return summary + (f", **{failed} failed**" if failed else ", none failed")

    lines = ["| gate check | bound (fails past it, if significant) | healthy updates: n, min … median … max "
             "| scrambled windows | naive's updates (no replay) |",
             "|---|---|---|---|---|"]
    for name, by_kind in spread.items():
        if not bounds[name]:  # a check only naive's gate applies
            continue
        low, high = min(bounds[name]), max(bounds[name])
        bound = f"{low:.3f}" if low == high else f"{low:.3f} – {high:.3f}"
        lines.append(f"| {name} | {bound} | {values(by_kind['healthy'])} | "
                     f"{values(by_kind['scrambled'])} | {values(by_kind['naive'], low)} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("documents", nargs="+", type=Path, help="JSON documents written by the suite")
    parser.add_argument("--against", type=Path, help="a suite document to set each stream's final answers "
                                                     "against, ticket by ticket")
    args = parser.parse_args(argv)
    results: dict[str, dict[str, Any]] = {}
    others: list[tuple[str, dict[str, Any]]] = []  # runs without the default: naive or joint run apart
    for path in args.documents:
        for name, result in json.loads(path.read_text())["results"].items():
            if "default" in result:
                results[name if name not in results else f"{name} ({path})"] = result
            else:
                others.append((name, result))
    for name, result in others:  # beside the same stream's default, where that has no such method
        if name in results and not results[name].keys() & result.keys():
            results[name].update(result)
    tables = markdown(results) + "\n" + spread_markdown(results)
    if args.against is not None:
        tables += "\n" + paired_markdown(results, json.loads(args.against.read_text())["results"])
    print(tables)
    return tables


if __name__ == "__main__":
    main()
