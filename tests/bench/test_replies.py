"""`bench/replies.py` end to end on the tiny model: BANKING77 tickets carrying their intent's
macro, through the product's update path, answered in the chat format (the pipeline and its
figures, not the tiny model's replies)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import SMOKE_TRAIN_JSON, load_bench


def test_replies_smoke_runs_the_product_path(tmp_path: Path, tiny_llama: Path) -> None:
    bench = load_bench("replies")
    plot = tmp_path / "replies.png"
    doc = bench.main(["--preset", "smoke", "--base", str(tiny_llama), "--methods", "default,joint",
                      "--train-json", SMOKE_TRAIN_JSON,
                      "--gate-json", '{"require_learning": false, "max_canary_increase": null, "reply_generations": 2, '
                                    '"reply_max_tokens": 8}',
                      "--recurring", "--out", str(tmp_path), "--plot", str(plot)])
    written = json.loads((tmp_path / "replies-smoke.json").read_text())
    assert written["methods"].keys() == doc["methods"].keys() == {"default", "joint"}
    default = written["methods"]["default"]
    assert len(default["matched"]) == 2 and len(default["base_matched"]) == 2
    assert default["matched"][0][1] is None and all(0 <= v <= 1 for v in default["matched"][1] + default["rouge_l"][1])
    assert [u["windows"] for u in default["updates"]] == [[1], [2]]
    second = {c["name"] for c in default["updates"][1]["checks"]}
    assert {"reply loss increase on earlier windows", "reply ROUGE-L drop on earlier windows"} <= second
    assert len(written["methods"]["joint"]["matched"]) == 1 and plot.stat().st_size > 0
    # Every intent again in new tickets, with its macro then with the next intent's: judged by the reply checks.
    recurring = default["recurring"]
    assert list(recurring) == ["healthy", "shifted"] and written["methods"]["joint"]["recurring"] == {}
    assert [u["windows"] for u in recurring.values()] == [[3], [4]]
    assert all({"reply loss increase on earlier windows", "reply ROUGE-L drop on earlier windows"}
               <= {c["name"] for c in u["checks"]} for u in recurring.values())


def test_recurring_windows_bring_every_intent_in_new_tickets_with_its_macro_then_the_next_ones() -> None:
    bench = load_bench("replies")
    stream = bench.make_stream("banking77", bench.PRESETS["quick"], 0)
    macros = bench.load_replies("banking77")
    windows = bench.recurring_windows(stream, macros, 8, seed=0)
    seen = [label for window in stream.labels for label in window]
    streamed = {r.id for window in stream.train for r in window}
    ids = [r.id for rows in windows.values() for r in rows]
    assert len(ids) == len(set(ids)) == 2 * 8 * len(seen) and not set(ids) & streamed
    assert all(r.reply == macros[r.label] for r in windows["healthy"])
    assert all(r.reply == macros[seen[(seen.index(r.label) + 1) % len(seen)]] != macros[r.label]
               for r in windows["shifted"])
