"""`bench/private_round.py` end to end on the tiny model: each run's adapter, σ and figures (the tiny
random llama learns too little in a smoke run for accuracy claims)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from learners.config import TrainSettings
from learners.privacy import epsilon, mechanism
from tests.conftest import SMOKE_TRAIN_JSON, load_bench


def test_private_round_bench_smoke_trains_each_run_at_its_size_and_spends_the_epsilon_asked(
        tmp_path: Path, tiny_llama: Path) -> None:
    bench, threads = load_bench("private_round"), torch.get_num_threads()
    one_thread = json.dumps({**json.loads(SMOKE_TRAIN_JSON), "threads": 1})
    try:
        doc = bench.main(["--preset", "smoke", "--base", str(tiny_llama), "--train-per-intent", "3", "--epsilon", "4",
                          "--train-json", one_thread, "--out", str(tmp_path)])
        assert torch.get_num_threads() == 1  # `train.threads`: it trains in this process
    finally:
        torch.set_num_threads(threads)
    assert json.loads((tmp_path / "private-round-smoke.json").read_text()) == json.loads(json.dumps(doc))
    results = doc["results"]
    assert [(r["tickets"], r["run"]) for r in results] == [
        (6, run) for run in ("base", "plain", "private", "private-default-adapter")]
    by = {(r["tickets"], r["run"]): r for r in results}
    cfg = TrainSettings.model_validate(json.loads(SMOKE_TRAIN_JSON))
    assert by[6, "plain"]["noise_multiplier"] is None and by[6, "plain"]["learning_rate"] == cfg.learning_rate
    assert by[6, "base"]["steps"] == 0 < by[6, "plain"]["steps"] and by[6, "base"]["learning_rate"] is None
    assert by[6, "base"]["noise_multiplier"] is None  # nothing trained, nothing noised
    # The private adapter has the fewer weights, and trains at its own rate.
    assert by[6, "private"]["adapter_weights"] < by[6, "private-default-adapter"]["adapter_weights"] \
        == by[6, "plain"]["adapter_weights"]
    assert by[6, "private"]["learning_rate"] == cfg.privacy.learning_rate
    for run in ("private", "private-default-adapter"):
        r = by[6, run]  # a third of the round a step; its σ spends ε = 4 over four such rounds
        assert r["batch_size"] == 2
        private = cfg.model_copy(update={"batch_size": 2, "privacy": cfg.privacy.model_copy(
            update={"noise_multiplier": r["noise_multiplier"]})})
        plan = mechanism(6, 6, private)
        assert r["steps"] == plan.steps and epsilon([plan] * 4, 1e-6) == pytest.approx(4.0, rel=1e-3)
    assert all(0 <= by[6, run]["accuracy"] <= 1 for run in bench.RUNS)
    table = (tmp_path / "private-round-smoke.md").read_text()
    assert table.count("| private |") == 1 and "× plain" in table
