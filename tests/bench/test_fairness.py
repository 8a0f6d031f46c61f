"""`bench/fairness.py` on the tiny model: small requests take turns with the largest allowed ones."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import load_bench


def test_small_requests_do_not_wait_for_the_largest_allowed_ones(tmp_path: Path, tiny_llama: Path) -> None:
    out = tmp_path / "fairness.json"
    doc = load_bench("fairness").main(["--rounds", "6", "--base", str(tiny_llama), "--out", str(out)])
    assert json.loads(out.read_text())["largest_classify"] == doc["largest_classify"]
    classify = doc["largest_classify"]
    assert classify["work_tokens"] <= classify["budget"] and classify["work_tokens"] > 0.9 * classify["budget"]
    assert doc["largest_chat"]["prompt_tokens"] > 0.9 * doc["largest_chat"]["max_prompt_tokens"]
    for phase in ("under_largest_classify", "under_largest_chat"):
        large = doc[phase]["large"]
        assert large["n"] >= 1
        for path in ("/v1/classify", "/v1/chat/completions"):
            small = doc[phase][path]
            assert small["n"] == 3
            # Before turns, a small request waited for the large one to finish (a chat answer's
            # whole generation): its slowest answer took as long as a large request.
            assert small["max_s"] < large["p50_s"] / 2, (phase, path, small, large)
