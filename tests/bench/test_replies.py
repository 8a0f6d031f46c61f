"""`bench/replies.py` end to end on the tiny model: BANKING77 tickets carrying their intent's
macro, through the product's update path, answered in the chat format (the pipeline and its
figures, not the tiny model's replies)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import load_bench


def test_replies_smoke_runs_the_product_path(tmp_path: Path, tiny_llama: Path) -> None:
    bench = load_bench("replies")
    plot = tmp_path / "replies.png"
    doc = bench.main(["--preset", "smoke", "--base", str(tiny_llama), "--methods", "default,joint",
                      "--train-json", '{"learning_rate": 3e-3, "epochs": 4, "batch_size": 8}',
                      "--gate-json", '{"require_learning": false, "max_canary_increase": null, "reply_generations": 2, '
                                    '"reply_max_tokens": 8}',
                      "--out", str(tmp_path), "--plot", str(plot)])
    written = json.loads((tmp_path / "replies-smoke.json").read_text())
    assert written["methods"].keys() == doc["methods"].keys() == {"default", "joint"}
    default = written["methods"]["default"]
    assert len(default["matched"]) == 2 and len(default["base_matched"]) == 2
    assert default["matched"][0][1] is None and all(0 <= v <= 1 for v in default["matched"][1] + default["rouge_l"][1])
    assert [u["windows"] for u in default["updates"]] == [[1], [2]]
    second = {c["name"] for c in default["updates"][1]["checks"]}
    assert {"reply loss increase on earlier windows", "reply ROUGE-L drop on earlier windows"} <= second
    assert len(written["methods"]["joint"]["matched"]) == 1 and plot.stat().st_size > 0
