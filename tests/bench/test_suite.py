"""`bench/suite.py` end to end on the tiny model: the product's update path on a mixed stream,
with a scrambled window at the end (the pipeline and its figures, not the tiny model's verdicts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import SMOKE_TRAIN_JSON, load_bench


def test_mixed_streams_are_namespaced_and_windows_new() -> None:
    bench = load_bench("suite")
    stream = bench.make_stream("mixed", bench.PRESETS["quick"], seed=0)
    prefixes = [{label.split(":")[0] for label in window} for window in stream.labels]
    assert prefixes == [{"banking"}, {"clinc"}, {"hwu"}]
    assert all(len(set(w)) == 4 for w in stream.labels)
    for labels, train, test in zip(stream.labels, stream.train, stream.test, strict=True):
        assert {r.label for r in train} == {r.label for r in test} == set(labels)
        assert not {r.id for r in train} & {r.id for r in test}
    poison = bench.poison_window(stream, bench.PRESETS["quick"], seed=0)
    seen = {label for w in stream.labels for label in w}
    assert poison and not {r.label for r in poison} & seen


def test_suite_smoke_runs_the_product_path(tmp_path: Path, tiny_llama: Path) -> None:
    bench = load_bench("suite")
    doc = bench.main(["--preset", "smoke", "--base", str(tiny_llama), "--streams", "mixed", "--poison",
                      "--train-json", SMOKE_TRAIN_JSON, "--out", str(tmp_path)])
    written = json.loads((tmp_path / "suite-smoke.json").read_text())
    result = written["results"]["mixed"]
    assert result.keys() == doc["results"]["mixed"].keys() == {"default", "naive", "joint", "targets_met"}
    default = result["default"]
    assert len(default["matrix"]) == 2 and len(default["base_zero_shot"]) == 2
    assert default["matrix"][0][1] is None and all(0 <= v <= 1 for v in default["matrix"][1])
    # Window 1 at the end among its own labels: a ticket right among more labels is right among
    # fewer (label scores do not depend on the other candidates); one ticket of slack for near-ties.
    assert -1 <= default["forgetting_among_known"] <= default["forgetting"] + 1 / 8 + 1e-9
    healthy, poisoned = default["updates"][:2], default["updates"][2:]
    assert [u["windows"] for u in healthy] == [[1], [2]] and poisoned[0]["poisoned"]
    # Every update reached the gate, and its verdict is what its checks say.
    assert all(u["checks"] and (u["status"] == "promoted") == all(c["passed"] for c in u["checks"])
               for u in default["updates"])
    assert all(u["cpu_seconds"] > 0 and u["search"] is None for u in default["updates"])
    assert all(u["status"] == "promoted" for u in result["naive"]["updates"])  # naive's gate lets all through
    assert len(result["joint"]["matrix"]) == 1 and result["joint"]["updates"][0]["windows"] == [1]
    assert "poisoned_update_rejected" in result["targets_met"]
    assert "| mixed |" in (tmp_path / "suite-smoke.md").read_text()
    # Each gate check's values, healthy against scrambled and naive's, and two runs' documents merged.
    report = load_bench("suite_report")
    spread, bounds = report.check_spread(written["results"])
    for kind, updates in (("healthy", healthy), ("scrambled", poisoned), ("naive", result["naive"]["updates"])):
        assert sorted(v for by_kind in spread.values() for v in by_kind[kind]) == sorted(
            (c["observed"], c["passed"]) for u in updates for c in u["checks"])
    assert "drop on window N" in spread and bounds["drop on window N"] == {written["gate"]["max_drop"]}
    assert "| gate check |" in (tmp_path / "suite-smoke.md").read_text()
    merged = report.main([str(tmp_path / "suite-smoke.json")] * 2)
    assert "| mixed |" in merged and f"| mixed ({tmp_path / 'suite-smoke.json'}) |" in merged
    # A method run apart (naive, in another process) joins its stream's default in the tables.
    for method, keys in (("default", {"default", "targets_met"}), ("naive", {"naive"})):
        (tmp_path / f"{method}.json").write_text(json.dumps(
            {"results": {"mixed": {k: v for k, v in result.items() if k in keys}}}))
    merged = report.main([str(tmp_path / "default.json"), str(tmp_path / "naive.json")])
    row = next(line for line in merged.splitlines() if line.startswith("| mixed |"))
    assert f"| {result['naive']['final_accuracy']:.3f}, {result['naive']['forgetting']:+.3f} |" in row
    # The final answers, ticket by ticket, against a baseline's on the same tickets: one flipped.
    final = default["final_correct"]
    assert [final[w].count("1") / len(final[w]) for w in ("1", "2")] == pytest.approx(default["matrix"][-1])
    right = final["1"][0] == "1"
    final["1"] = ("0" if right else "1") + final["1"][1:]
    (tmp_path / "baseline.json").write_text(json.dumps(written))
    paired = report.main([str(tmp_path / "suite-smoke.json"), "--against", str(tmp_path / "baseline.json")])
    row = next(line for line in paired.splitlines() if line.startswith("| mixed |") and line.count("|") == 8)
    assert row.endswith("| 0 | 1 | 1.000 | 0.500 |" if right else "| 1 | 0 | 0.500 | 1.000 |")
    final["2"] = final["2"][1:]
    (tmp_path / "baseline.json").write_text(json.dumps(written))
    with pytest.raises(ValueError, match="not the same test tickets"):
        report.main([str(tmp_path / "suite-smoke.json"), "--against", str(tmp_path / "baseline.json")])


def test_suite_searches_with_hpo_trials_and_reports_each_updates_cpu(tmp_path: Path, tiny_llama: Path) -> None:
    bench = load_bench("suite")
    bench.main(["--preset", "smoke", "--base", str(tiny_llama), "--streams", "mcid", "--methods", "default",
                "--hpo-trials", "2", "--train-json", '{"batch_size": 8}', "--out", str(tmp_path)])
    written = json.loads((tmp_path / "suite-smoke-hpo2.json").read_text())
    assert written["hpo"]["trials"] == 2
    updates = written["results"]["mcid"]["default"]["updates"]
    assert [len(u["search"]["trials"]) for u in updates] == [2, 2]
    # The searches cost CPU beyond the candidate's training: the training process's, per update.
    assert all(u["cpu_seconds"] > 0 for u in updates)
