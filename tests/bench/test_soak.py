"""`bench/soak.py` for 24 seconds of load on the tiny model: the real figures of a short soak with a
broker stop and a kill -9 (service and broker in processes of their own, real HTTP and Kafka)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import load_bench


def test_short_soak_loses_and_duplicates_nothing_through_a_broker_stop_and_a_kill_9(
        tmp_path: Path, tiny_llama: Path) -> None:
    bench = load_bench("soak")
    out = tmp_path / "soak.json"
    doc = bench.main(["--minutes", "0.4", "--base", str(tiny_llama), "--rate", "5", "--bad-percent", "3",
                      "--broker-stop-s", "5", "--sample-s", "2", "--out", str(out)])
    assert json.loads(out.read_text())["tickets"] == doc["tickets"]

    tickets = doc["tickets"]
    assert tickets["good"] > 100 and tickets["via_api"] > 0
    assert tickets["stored"] == tickets["good"]
    assert tickets["lost"] == tickets["duplicated"] == tickets["unexpected"] == 0
    # Every bad message is in the dead-letter topic with its reason, one kind of each.
    assert tickets["bad_dead_lettered"] == tickets["bad"] == 3 and tickets["bad_without_reason"] == 0
    assert set(tickets["dead_letter_reasons"]) == {"not_json", "invalid_fields", "not_object"}

    # The restart recovered: served again, no training process left behind by the kill.
    restart = doc["restart"]
    assert restart["classify_answered_after"] > 0 and restart["orphans"] == 0
    routes = doc["routes"]
    assert {route: r["failed"] for route, r in routes.items() if r["failed"]} == {}
    assert routes["/v1/classify"]["answered"] > 0 and routes["/v1/chat/completions"]["answered"] > 0
    assert routes["/v1/classify"]["p99_ms"] >= routes["/v1/classify"]["p50_ms"] > 0
    memory = doc["memory"]
    assert memory["start"]["rss_mb"] > 0 and memory["end"]["fds"] > 0
    assert doc["graceful_stop_s"] is not None  # SIGTERM stopped the restarted service
