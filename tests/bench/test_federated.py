"""`bench/federated.py` end to end on the tiny model: the split, the private rounds' accounting and
the figures (the tiny random llama learns too little in a smoke run for accuracy claims)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import SMOKE_TRAIN_JSON, load_bench


def test_federated_bench_smoke_splits_the_stream_and_spends_each_sites_epsilon(
        tmp_path: Path, tiny_llama: Path) -> None:
    bench = load_bench("federated")
    doc = bench.main(["--preset", "smoke", "--base", str(tiny_llama), "--epsilons", "4",
                      "--train-json", SMOKE_TRAIN_JSON, "--out", str(tmp_path)])
    assert json.loads((tmp_path / "federated-smoke.json").read_text()) == json.loads(json.dumps(doc))
    sizes = doc["preset_sizes"]
    per_window = sizes["intents_per_window"] * sizes["train_per_intent"]
    # Every window's tickets dealt among the three sites, none twice, not evenly.
    assert [sum(site[w] for site in doc["site_tickets"]) for w in range(sizes["windows"])] == \
        [per_window] * sizes["windows"]
    assert results_keys(doc) == ["base", "centralized", "dp-eps-4", "federated"]
    private = doc["results"]["dp-eps-4"]
    # Each site's σ is the one at which its rounds over the stream spend the ε asked for, by the
    # service's accountant: replayed tickets counted in every round they join.
    assert private["epsilon_spent"] == pytest.approx([4.0] * 3, rel=1e-3)
    assert all(sigma > 0 for sigma in private["noise_multipliers"])
    assert doc["results"]["federated"]["noise_multipliers"] == [None] * 3
    for r in doc["results"].values():
        assert len(r["matrix"]) == sizes["windows"] and 0 <= r["average_accuracy"] <= 1
    table = (tmp_path / "federated-smoke.md").read_text()
    assert all(f"| {name} |" in table for name in doc["results"])
    assert (tmp_path / "federated-smoke-epsilon.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(doc["targets_met"]) == {"federated_ge_0.95_centralized", "federated_forgetting_le_2_points"}


def results_keys(doc: dict[str, object]) -> list[str]:
    return sorted(doc["results"])  # type: ignore[arg-type]
