"""`/v1/adapters`: listings that summarize gate reports, one version's whole report, figures JSON
cannot hold, the admin's override of a rejected version, GGUF exports (real uvicorn server)."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path

from gguf import GGUFReader

from learners.config import AdapterSettings, GateSettings
from learners.reports import Canary, Check, GateReport, WindowScore
from service.deps import VERSION_HEADER
from service.routes.adapters import SHA256_HEADER
from service.settings import Settings
from tests.conftest import LiveService, add_version_of, add_versions, tiny_settings
from tests.service.routes.conftest import FIVE_WINDOW_SUMMARY, five_window_rejection


def test_a_diverged_candidate_is_served_with_null_losses(serve: Callable[[Settings], LiveService],
                                                         tmp_path: Path) -> None:
    # JSON has no NaN or infinity: a diverged round's figures must not make the API answer 500.
    live = serve(tiny_settings(tmp_path, None))
    nan = float("nan")
    gate = GateReport(passed=False, reason="canary loss increase over the base model", new_windows=(1,),
                      candidate={1: WindowScore(accuracy=0.0, loss=float("inf"), n=4)},
                      live={1: WindowScore(accuracy=0.5, loss=0.7, n=4)},
                      canary=Canary(candidate=nan, live=1.0, base=1.0),
                      checks=[Check(name="canary loss increase over the base model", passed=False, observed=nan,
                                    threshold=0.2)], thresholds=GateSettings())
    diverged = add_versions(live.service.registry, 1, ["a", "b"], gate=gate, verdict="rejected")[0]
    live.service.matrix.record_gate(diverged, "v0000", gate)
    client = live.client()
    listed = client.get("/v1/adapters")
    assert listed.status_code == 200
    summary = next(a for a in listed.json()["adapters"] if a["name"] == diverged)["gate"]
    assert summary["canary"]["candidate"] is None and summary["canary"]["drift"] is None
    shown = client.get(f"/v1/adapters/{diverged}").json()["gate"]
    assert shown["candidate"]["1"]["loss"] is None and shown["live"]["1"]["loss"] == 0.7
    assert shown["canary"]["candidate"] is None and shown["canary"]["drift"] is None
    assert shown["checks"][0]["observed"] is None
    forgetting = client.get("/v1/forgetting")
    assert forgetting.status_code == 200, forgetting.text
    read_back = live.service.registry.info(diverged).gate
    assert read_back is not None and read_back.canary is not None and math.isnan(read_back.canary.candidate)


def test_the_listing_summarizes_gate_reports_and_a_version_serves_its_whole_report(
        serve: Callable[[Settings], LiveService], tmp_path: Path) -> None:
    # A listing's size must not grow with the windows: per-window scores and checks stay out of it.
    live = serve(tiny_settings(tmp_path, None))
    gate = five_window_rejection()
    rejected = add_versions(live.service.registry, 1, ["a", "b"], gate=gate, verdict="rejected")[0]
    client = live.client()

    listed = {a["name"]: a for a in client.get("/v1/adapters").json()["adapters"]}
    assert listed["v0000"]["gate"] is None
    assert listed[rejected]["gate"] == FIVE_WINDOW_SUMMARY
    assert listed[rejected]["verdict"] == "rejected" and listed[rejected]["labels"] == ["a", "b"]

    whole = client.get(f"/v1/adapters/{rejected}")
    assert whole.status_code == 200
    version = whole.json()
    assert {k: v for k, v in version.items() if k != "gate"} == {k: v for k, v in listed[rejected].items()
                                                                 if k != "gate"}
    assert version["gate"] == json.loads(gate.model_dump_json())
    assert set(version["gate"]["candidate"]) == {"1", "2", "3", "4", "5"} and len(version["gate"]["checks"]) == 4
    assert client.get("/v1/adapters/v0000").json()["gate"] is None

    for unknown in ("v9999", "latest", "v12"):  # v12: not a name the registry makes (v0012 is)
        refused = client.get(f"/v1/adapters/{unknown}")
        assert refused.status_code == 404 and refused.json()["detail"] == f"unknown adapter version {unknown!r}"


def test_a_rejected_version_is_never_served_unless_an_admin_overrides(
        serve: Callable[[Settings], LiveService], tmp_path: Path) -> None:
    live = serve(tiny_settings(tmp_path, None))
    gate = GateReport(passed=False, reason="drop on window 1", new_windows=(1,), candidate={}, live={},
                      thresholds=GateSettings())
    rejected = add_versions(live.service.registry, 1, ["a", "b"], gate=gate, verdict="rejected")[0]
    client = live.client()
    before = client.get("/v1/adapters").json()
    assert before["live"] == "v0000"
    assert next(a for a in before["adapters"] if a["name"] == rejected)["verdict"] == "rejected"

    promoted = client.post(f"/v1/adapters/{rejected}/promote", headers=live.admin)
    assert promoted.status_code == 200
    assert [o["action"] for o in promoted.json()["overrides"]] == ["promote"]
    after = client.get("/v1/adapters").json()
    assert after["live"] == rejected
    assert next(a for a in after["adapters"] if a["name"] == rejected)["overrides"][0]["action"] == "promote"
    answer = client.post("/v1/classify", json={"text": "hi", "labels": ["a", "b"]}).json()
    assert answer["adapter_version"] == rejected
    no_broker = client.post("/v1/tickets", json={"id": "t1", "text": "hi"}, headers=live.admin)
    assert no_broker.status_code == 409 and "kafka.bootstrap" in no_broker.json()["detail"]


def test_an_export_is_streamed_to_admins_with_its_sha256_and_refused_with_reasons(
        serve: Callable[[Settings], LiveService], tmp_path: Path, tiny_llama: Path) -> None:
    live = serve(tiny_settings(tmp_path, None))
    registry = live.service.registry
    [version] = add_versions(registry, 1, ["a", "b"])
    prefix = add_version_of(registry, tiny_llama, AdapterSettings(method="prefix", virtual_tokens=4), ["a"])
    client = live.client()
    url = f"/v1/adapters/{version}/export"
    assert client.get(url, params={"quant": "q8_0"}).status_code == 401

    got = client.get(url, params={"format": "gguf", "quant": "q8_0"}, headers=live.admin)
    assert got.status_code == 200, got.text
    assert got.headers[SHA256_HEADER] == hashlib.sha256(got.content).hexdigest()
    assert got.headers[VERSION_HEADER] == version and got.content[:4] == b"GGUF"
    assert got.headers["content-disposition"] == f'attachment; filename="evergreen-{version}-q8_0.gguf"'
    cached = registry.exports(version) / "model-q8_0.gguf"
    assert cached.read_bytes() == got.content
    made = cached.stat().st_mtime_ns
    again = client.get(url, params={"quant": "q8_0"}, headers=live.admin)  # served from the registry
    assert again.content == got.content and cached.stat().st_mtime_ns == made

    adapter = client.get("/v1/adapters/live/export", params={"quant": "f16", "adapter_only": True},
                         headers=live.admin)
    assert adapter.status_code == 200 and adapter.headers[VERSION_HEADER] == "v0000"
    (tmp_path / "lora.gguf").write_bytes(adapter.content)
    assert GGUFReader(tmp_path / "lora.gguf").get_field("adapter.type").contents() == "lora"

    refusals = {
        ("v0999", "q8_0", False): (404, "unknown adapter version 'v0999'"),
        (version, "q4_0", True): (400, "f16 or q8_0, not q4_0"),
        (prefix, "f16", False): (409, "prefix_tuning, prompt learning: its virtual tokens cannot be merged"),
        (prefix, "f16", True): (409, "prefix_tuning, prompt learning"),
    }
    for (name, quant, adapter_only), (code, reason) in refusals.items():
        refused = client.get(f"/v1/adapters/{name}/export", params={"quant": quant, "adapter_only": adapter_only},
                             headers=live.admin)
        assert refused.status_code == code and reason in refused.json()["detail"], refused.text
    for bad in ({"quant": "q5_1"}, {"format": "safetensors"}):
        assert client.get(url, params=bad, headers=live.admin).status_code == 422
    assert not list(registry.exports(prefix).iterdir())

    # Retention deletes a version's exports with its weights; its record stays, its export is refused.
    assert registry.prune(keep_rejected=0, keep_superseded=0) == [version, prefix]
    pruned = client.get(url, params={"quant": "q8_0"}, headers=live.admin)
    assert pruned.status_code == 409 and "pruned" in pruned.json()["detail"]
    assert not cached.exists()
