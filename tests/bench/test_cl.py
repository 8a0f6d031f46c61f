"""`bench/cl.py` end to end on the tiny model: the benchmark's pipeline, not its verdicts
(the tiny random llama learns too little in a smoke run for accuracy claims)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from streams.datasets import load_tickets
from tests.conftest import SMOKE_TRAIN_JSON, load_bench


def test_cl_bench_smoke_writes_matrices_metrics_and_heatmaps(tmp_path: Path, tiny_llama: Path) -> None:
    bench = load_bench("cl")
    doc = bench.main(["--preset", "smoke", "--base", str(tiny_llama), "--methods", "naive,replay,ewc+replay,joint",
                      "--train-json", SMOKE_TRAIN_JSON,
                      "--out", str(tmp_path)])
    written = json.loads((tmp_path / "cl-smoke.json").read_text())
    assert written["results"].keys() == doc["results"].keys() == {"naive", "replay", "ewc+replay", "joint"}
    windows = doc["preset_sizes"]["windows"]
    assert [len(w) for w in doc["windows"]] == [doc["preset_sizes"]["intents_per_window"]] * windows
    for method, r in doc["results"].items():
        matrix = r["matrix"]
        assert len(matrix) == (1 if method == "joint" else windows)
        for i, row in enumerate(matrix):  # class-incremental: no window is tested before it is learned
            learnt = windows if method == "joint" else i + 1
            assert all(0 <= v <= 1 for v in row[:learnt]) and all(v is None for v in row[learnt:])
        if method != "joint":  # ours agree with Avalanche's; forgetting from the peak bounds theirs
            assert r["backward_transfer"] == pytest.approx(r["avalanche_bwt"])
            assert r["average_forgetting"] == pytest.approx(r["avalanche_average_forgetting"])
            assert r["peak_forgetting"] >= r["average_forgetting"] - 1e-12
        png = tmp_path / f"cl-smoke-{method.replace('+', '-')}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (tmp_path / "cl-smoke.md").read_text()
    assert all(f"| {m} |" in table for m in doc["results"])
    assert set(doc["targets_met"]) >= {"default_forgetting_le_2_points", "naive_forgets_at_least_10_points_more"}


def test_cl_stream_of_another_data_set_takes_its_intents_and_as_many_tickets_as_asked() -> None:
    bench = load_bench("cl")
    preset = bench.Preset(windows=2, intents_per_window=3, train_per_intent=500, test_per_intent=None)
    stream = bench.make_stream(preset, 0, "stackoverflow")
    tags = {r.label for r in load_tickets("stackoverflow", "train")}
    assert all(set(window) <= tags and len(window) == 3 for window in stream.labels)
    assert [len(rows) for rows in stream.train] == [1500, 1500]  # 500 of each tag: BANKING77 has ~117
    assert {r.label for r in stream.test[1]} == set(stream.labels[1])
    assert stream.labels != bench.make_stream(preset, 0).labels  # the default is still BANKING77
