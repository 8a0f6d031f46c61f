"""A long history served over HTTP: the forgetting report and the adapter list a page at a time,
their figures equal to the slow path's (every lineage walked from its root, every file read), and
the registry's in-memory index following what another process writes to a shared registry.
Registries are grown by the product's own bookkeeping (bench/history.py's `History`)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from learners.accuracy_matrix import Row, summarize
from learners.config import GateSettings
from learners.gate import judge
from learners.reports import ReplyScore, WindowScore
from service.forgetting import BASE, AccuracyMatrix
from service.registry import AdapterRegistry
from service.settings import ReplicaSettings, Settings
from tests.conftest import ROOT, LiveService, add_versions, gauge, load_bench, tiny_settings

HISTORY = load_bench("history")
EVERYTHING = {"limit": 1000, "window_limit": 1000}


def grow(data: Path, updates: int, windows: int) -> None:
    HISTORY.build(data, updates, windows, rejected_share=0.25, seed=1)


def slow_summary(registry: AdapterRegistry, matrix: AccuracyMatrix, name: str) -> dict[str, Any]:
    """A version's figures the way the report used to draw them: its whole lineage, file by file."""
    chain = []
    current: str | None = name
    while current is not None:
        info = registry.info(current)
        chain.append(Row(info.name, frozenset(info.windows_trained), matrix.accuracy(info.name)))
        current = info.parent
    summary = summarize(chain[::-1], matrix.accuracy(BASE))[-1]
    return {**asdict(summary), "forgetting": {str(w): f for w, f in summary.forgetting.items()}}


def test_forgetting_report_pages_a_long_history_with_the_slow_paths_figures(
        serve: Callable[[Settings], LiveService], tmp_path: Path) -> None:
    grow(tmp_path, updates=40, windows=12)
    live = serve(tiny_settings(tmp_path, None))
    registry, matrix = live.service.registry, live.service.matrix
    client = live.client()
    full = client.get("/v1/forgetting", params=EVERYTHING).json()
    names = registry.names()
    assert [v["name"] for v in full["versions"]] == names and full["versions_total"] == len(names) == 41
    assert full["windows"] == list(range(1, 13)) and full["windows_total"] == 12
    assert any(v["pruned"] for v in full["versions"]) and any(v["verdict"] == "rejected" for v in full["versions"])
    for row in full["versions"]:
        assert row["summary"] == slow_summary(registry, matrix, row["name"])
    by_name = {row["name"]: row for row in full["versions"]}

    # A page: the newest versions, the same figures; paging back reaches the older ones.
    page = client.get("/v1/forgetting", params={"limit": 5}).json()
    newest = sorted({*names[-5:], registry.live}, key=names.index)  # the live one is always in
    assert [v["name"] for v in page["versions"]] == newest == [a["name"] for a in client.get(
        "/v1/adapters", params={"limit": 5}).json()["adapters"]]
    assert all(row == by_name[row["name"]] for row in page["versions"])
    older = client.get("/v1/forgetting", params={"limit": 5, "before": names[-5]}).json()
    assert [v["name"] for v in older["versions"]] == names[-10:-5]
    # The newest windows' cells; the figures still cover every window.
    narrow = client.get("/v1/forgetting", params={"limit": 1000, "window_limit": 3}).json()
    assert narrow["windows"] == [10, 11, 12] and set(narrow["base"]) <= {"10", "11", "12"}
    for row in narrow["versions"]:
        assert set(row["accuracy"]) <= {"10", "11", "12"} and set(row["summary"]["forgetting"]) <= {"10", "11", "12"}
        assert row["summary"]["average_accuracy"] == by_name[row["name"]]["summary"]["average_accuracy"]
    for path in ("/v1/forgetting", "/v1/adapters"):
        assert client.get(path, params={"before": "v9999"}).status_code == 404
        assert client.get(path, params={"limit": 0}).status_code == 422


def test_pages_keep_the_live_version_wherever_it_is(serve: Callable[[Settings], LiveService], tmp_path: Path) -> None:
    grow(tmp_path, updates=12, windows=12)
    live = serve(tiny_settings(tmp_path, None))
    client = live.client()
    registry = live.service.registry
    registry.promote(registry.names()[0])  # back to the first version, as an admin may do
    assert client.get("/v1/forgetting", params={"limit": 2}).json()["live"] == "v0000"
    for path, key in (("/v1/forgetting", "versions"), ("/v1/adapters", "adapters")):
        rows = client.get(path, params={"limit": 2}).json()[key]
        assert [r["name"] for r in rows] == ["v0000", *registry.names()[-2:]] and rows[0]["live"]


# Another process writes the shared registry (the primary, seen from a replica): a version
# published and promoted, and retention pruning every old version it may.
PRIMARY = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from tests.conftest import load_bench
history = load_bench("history").History(Path(sys.argv[1]), windows=12, seed=2)
print(history.update(rejected=False, prune=False))
print(",".join(history.registry.prune(0, 0)))
"""


def test_replica_index_sees_what_the_primary_process_writes(
        serve: Callable[[Settings], LiveService], tmp_path: Path) -> None:
    grow(tmp_path / "primary", updates=12, windows=12)
    replica = serve(tiny_settings(tmp_path / "replica", None, registry_dir=tmp_path / "primary" / "registry",
                                  replicas=ReplicaSettings(role="replica")))
    client = replica.client()

    def models() -> list[str]:
        return [m["id"] for m in client.get("/v1/models").json()["data"]]

    before = models()  # the replica's index is now built
    pruned_before = gauge(client.get("/metrics").text, "evergreen_registry_pruned_total")
    written = subprocess.run([sys.executable, "-c", PRIMARY, str(tmp_path / "primary"), str(ROOT)],
                             capture_output=True, text=True, timeout=300, check=True).stdout.split()
    new, pruned = written[0], written[1].split(",")
    assert new not in before and pruned and set(pruned) <= set(before)
    after = models()
    assert new in after and not set(pruned) & set(after)
    assert gauge(client.get("/metrics").text, "evergreen_registry_pruned_total") == pruned_before + len(pruned)
    rows = {r["name"]: r for r in client.get("/v1/forgetting").json()["versions"]}
    assert rows[new]["live"] and all(rows[name]["pruned"] for name in pruned if name in rows)
    assert client.get("/v1/adapters").json()["live"] == new


def test_reply_figures_are_served_beside_the_accuracy_matrix(serve: Callable[[Settings], LiveService],
                                                              tmp_path: Path) -> None:
    """Issue 14: a gate's reply scores reach `/v1/forgetting`, cell by cell, next to the accuracy."""
    live = serve(tiny_settings(tmp_path, None))
    service = live.service
    [candidate] = add_versions(service.registry, 1, ["card_arrival"])
    scores = {1: WindowScore(accuracy=0.75, loss=0.4, n=4), 2: WindowScore(accuracy=1.0, loss=0.1, n=4)}

    def replies(rouges: list[float]) -> dict[int, ReplyScore]:
        return {1: ReplyScore(n=3, loss=0.8, answered=len(rouges), rouge_l=sum(rouges) / len(rouges),
                              matched=sum(r >= 0.8 for r in rouges) / len(rouges), rouges=tuple(rouges))}

    gate = judge(scores, scores, [2], GateSettings(), replies=(replies([0.2, 0.9]), replies([1.0, 0.9])))
    service.matrix.record_gate(candidate, "v0000", gate)
    rows = {r["name"]: r for r in live.client().get("/v1/forgetting").json()["versions"]}
    assert rows[candidate]["replies"] == {"1": {"loss": 0.8, "rouge_l": 0.55, "matched": 0.5, "n": 3, "answered": 2}}
    assert rows["v0000"]["replies"]["1"]["rouge_l"] == 0.95
    assert rows[candidate]["accuracy"] == {"1": 0.75, "2": 1.0}  # the same cells, both kinds
    service.matrix.record_rows({candidate: {1: WindowScore(accuracy=0.5, loss=0.9, n=4)}})  # a later gate
    assert AccuracyMatrix(service.matrix.path).replies(candidate)[1]["rouge_l"] == 0.55  # kept beside it
