"""`bench/long.py` on the tiny model: the stream's windows through the product's update path,
each update's cost split by phase, and a joint baseline given the stream's total steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import load_bench


def test_recurring_windows_bring_earlier_intents_in_new_tickets() -> None:
    bench = load_bench("long")
    preset = bench.PRESETS["quick"]
    stream = bench.make_stream("banking77", preset.stream, seed=0)
    recur = bench.recurring_windows(stream, preset, seed=0)
    seen = {label for window in stream.labels for label in window}
    streamed = {r.id for window in stream.train for r in window}
    assert len(seen) == 76 and len(recur) == preset.recur_windows
    ids = [r.id for window in recur for r in window]
    assert len(ids) == len(set(ids)) and not set(ids) & streamed
    assert all(len({r.label for r in window}) == preset.recur_intents and {r.label for r in window} <= seen
               for window in recur)


def test_the_wide_tests_are_the_next_test_tickets_of_each_windows_intents() -> None:
    bench = load_bench("long")
    preset = bench.PRESETS["quick"]
    stream = bench.make_stream("banking77", preset.stream, seed=0)
    wide = bench.wide_tests(stream, preset)
    own = {r.id for window in stream.test for r in window}
    assert sorted(wide) == list(range(1, 20)) and not own & {r.id for w in wide.values() for r in w}
    for w, intents in enumerate(stream.labels, 1):
        assert sorted(r.label for r in wide[w]) == sorted(intents * preset.wide_per_intent)


def test_a_refused_window_counts_as_learned_from_the_update_that_retries_it() -> None:
    forgetting_since_learned = load_bench("long").forgetting_since_learned
    learned = {1: 1.0}
    # Window 2's update is refused: its 0.25 is not what it learned, so it never counts as forgotten.
    assert forgetting_since_learned(learned, {1: 0.75, 2: 0.25}, promoted=False, trained=[2]) == 0.25
    assert learned == {1: 1.0}
    # The next update retries it with window 3 and is promoted: both count from here.
    assert forgetting_since_learned(learned, {1: 0.75, 2: 0.875, 3: 0.5}, promoted=True, trained=[2, 3]) == 0.25
    assert learned == {1: 1.0, 2: 0.875, 3: 0.5}
    assert forgetting_since_learned(learned, {1: 1.0, 2: 0.625, 3: 0.5}, promoted=True, trained=[]) == 0.25 / 3


def test_long_smoke_splits_each_update_and_gives_joint_the_same_steps(tmp_path: Path, tiny_llama: Path) -> None:
    bench = load_bench("long")
    bench.main(["--preset", "smoke", "--base", str(tiny_llama), "--out", str(tmp_path),
                "--plot", str(tmp_path / "long.png")])
    result = json.loads((tmp_path / "long-smoke.json").read_text())
    updates = result["updates"]
    assert [u["recurring"] for u in updates] == [False, False, False, True]
    for u in updates:
        assert u["status"] in {"promoted", "rejected"} and u["probes_scored"] > 0 and u["steps"] > 0
        assert 0 < u["train_s"] and 0 < u["gate_s"] and u["other_s"] > 0
        assert abs(u["snapshot_s"] + u["train_s"] + u["gate_s"] + u["other_s"] - u["seconds"]) < 1e-6
        assert len(u["accuracy"]) == min(u["window"], 3)
    total = sum(u["steps"] for u in updates)
    assert abs(result["joint"]["steps"] - total) <= 1, (result["joint"]["steps"], total)
    assert set(result["targets_met"]) >= {"last_update_le_1.5x_window_2", "final_ge_0.9_joint"}
    # Forgetting on more test tickets, none of them the stream's own, scored when learned and at the end.
    wide = result["wide"]
    assert wide["tickets_per_intent"] == 2 and wide["learned"].keys() == wide["final"].keys()
    learned_by_promotion = {str(w) for u in updates if u["status"] == "promoted" for w in u["windows"] if w <= 3}
    assert set(wide["learned"]) == learned_by_promotion
    assert wide["forgetting"] == pytest.approx(sum(wide["learned"][w] - wide["final"][w] for w in wide["final"])
                                               / len(wide["final"]))
    assert (tmp_path / "long.png").stat().st_size > 10_000
