"""The HTTP contract: auth scopes, bounded bodies, clear 4xx messages (real uvicorn server)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from learners.config import GateSettings
from learners.reports import Canary, Check, GateReport, WindowScore
from service.settings import ApiKey, ApiSettings, Settings
from service.update_log import UpdateRecord
from streams.broker import free_port
from streams.records import TicketRecord
from tests.conftest import LiveService, add_versions, tiny_settings


def test_auth_limits_and_errors(serve: Callable[[Settings], LiveService], tmp_path: Path) -> None:
    keys = [ApiKey(key=SecretStr("admin-key"), scopes={"admin", "query"}),
            ApiKey(key=SecretStr("query-key"), scopes={"query"})]
    live = serve(tiny_settings(tmp_path, None, api=ApiSettings(port=free_port(), keys=keys,
                                                              max_body_bytes=4096)))
    client = live.client()
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["adapter_version"] == "v0000"

    for method, path in (("POST", "/v1/updates"), ("POST", "/v1/rollback"),
                         ("POST", "/v1/adapters/v0000/promote")):
        assert client.request(method, path).status_code == 401
        assert client.request(method, path, headers={"Authorization": "Bearer nope"}).status_code == 401
        denied = client.request(method, path, headers={"Authorization": "Bearer query-key"})
        assert denied.status_code == 403 and "`admin`" in denied.json()["detail"]
    admin = {"Authorization": "Bearer admin-key"}
    assert client.post("/v1/rollback", headers=admin).status_code == 409
    assert client.post("/v1/adapters/v9999/promote", headers=admin).status_code == 404
    assert client.post("/v1/adapters/..%2Fetc/promote", headers=admin).status_code == 404
    assert client.post("/v1/updates", headers=admin).status_code == 202  # nothing to learn: skipped
    live.service.updates.cancel_and_wait(30)
    assert client.get("/v1/updates/1").json()["status"] == "skipped"
    assert client.get("/v1/updates/99").status_code == 404

    no_labels = client.post("/v1/classify", json={"text": "where is my card"})
    assert no_labels.status_code == 409 and "buffer holds no labelled ticket" in no_labels.json()["detail"]
    # Before any version has learned a label, the buffer's labels are scored zero-shot.
    live.service.buffer.add_many([TicketRecord(id=f"z{i}", text=f"ticket {i}", label=label)
                                  for i, label in enumerate(["card_arrival", "exchange_rate", "pin_blocked"])])
    zero_shot = client.post("/v1/classify", json={"text": "where is my card", "top_k": 5}).json()
    assert zero_shot["zero_shot"] and zero_shot["labels_from"] == "buffer" and zero_shot["candidates"] == 3
    assert {t["label"] for t in zero_shot["top"]} == {"card_arrival", "exchange_rate", "pin_blocked"}
    assert client.post("/v1/classify", json={"text": ""}).status_code == 422
    assert client.post("/v1/classify", content=b"{", headers={"content-type": "application/json"}
                       ).status_code == 422
    too_big = client.post("/v1/classify", json={"text": "x" * 5000})
    assert too_big.status_code == 413 and too_big.text == "Content Too Large"
    answer = client.post("/v1/classify", json={"text": "where is my card", "labels": ["a", "b"]}).json()
    assert answer["label"] in ("a", "b") and answer["adapter_version"] == "v0000"
    assert answer["labels_from"] == "request" and not answer["zero_shot"]

    metrics = client.get("/metrics").text
    assert 'evergreen_live_adapter_info{version="v0000"} 1.0' in metrics
    assert 'evergreen_http_requests_total{method="POST",route="/v1/classify",status="413"} 1.0' in metrics
    assert_gate_report_is_typed(client.get("/openapi.json").json())


def assert_gate_report_is_typed(openapi: dict[str, Any]) -> None:
    """The update record and the adapter document what a gate report holds, down to each check."""
    components = openapi["components"]["schemas"]

    def resolve(schema: dict[str, Any]) -> dict[str, Any]:
        """The component a (nullable) reference points to."""
        ref = next(s["$ref"] for s in schema.get("anyOf", [schema]) if "$ref" in s)
        return dict(components[ref.rsplit("/", 1)[1]])

    for record in ("UpdatePublic", "AdapterPublic"):
        gate = resolve(components[record]["properties"]["gate"])
        assert {"passed", "reason", "checks", "candidate", "live", "base", "canary", "thresholds"} \
            <= set(gate["properties"])
        check = resolve(gate["properties"]["checks"]["items"])
        assert {"name", "passed", "observed", "threshold", "p_value"} <= set(check["properties"])
        window = resolve(gate["properties"]["candidate"]["additionalProperties"])
        assert {"accuracy", "loss", "n"} <= set(window["properties"]) and "correct" not in window["properties"]
        assert "drift" in resolve(gate["properties"]["canary"])["properties"]
    for listed in ("AdapterSummary", "UpdateSummary"):  # what a listing holds of it
        summary = resolve(components[listed]["properties"]["gate"])
        assert {"passed", "reason", "checks_passed", "checks_failed", "canary", "thresholds"} \
            <= set(summary["properties"])
        assert not {"checks", "candidate", "live", "base"} & set(summary["properties"])


def test_metrics_report_updates_verdicts_and_live_accuracy(serve: Callable[[Settings], LiveService],
                                                           tmp_path: Path) -> None:
    live = serve(tiny_settings(tmp_path, None))
    registry = live.service.registry
    candidate = {1: WindowScore(accuracy=0.75, loss=0.5, n=4), 2: WindowScore(accuracy=0.5, loss=0.9, n=4)}
    gate = GateReport(passed=True, reason="passed", new_windows=(1, 2), candidate=candidate, live={},
                      thresholds=GateSettings())
    accepted = add_versions(registry, 1, ["a", "b"], gate=gate)[0]
    add_versions(registry, 2, ["a", "b"], gate=gate.model_copy(update={"passed": False}), verdict="rejected")
    client = live.client()
    assert client.post(f"/v1/adapters/{accepted}/promote", headers=live.admin).status_code == 200
    assert client.post("/v1/updates", headers=live.admin).status_code == 202  # nothing new: skipped
    live.service.updates.cancel_and_wait(30)

    metrics = client.get("/metrics").text
    assert f'evergreen_live_adapter_info{{version="{accepted}"}} 1.0' in metrics
    assert 'evergreen_live_window_accuracy{window="1"} 0.75' in metrics
    assert 'evergreen_live_window_accuracy{window="2"} 0.5' in metrics
    assert 'evergreen_gate_verdicts{verdict="accepted"} 1.0' in metrics
    assert 'evergreen_gate_verdicts{verdict="rejected"} 2.0' in metrics
    assert 'evergreen_update_duration_seconds_count{status="skipped"} 1.0' in metrics
    assert 'evergreen_update_duration_seconds_bucket{le="10.0",status="skipped"} 1.0' in metrics
    assert "evergreen_last_swap_seconds " in metrics
    assert 'evergreen_http_request_seconds_bucket{le="0.005",method="POST",route="/v1/adapters/{version}/promote"}' \
        in metrics


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


def five_window_rejection() -> GateReport:
    """A gate report that rejected a candidate of window 5 for forgetting window 1."""
    windows = range(1, 6)
    return GateReport(passed=False, reason="drop on window 1: 0.300 against threshold 0.050", new_windows=(5,),
                      candidate={w: WindowScore(accuracy=0.5, loss=0.9, n=4) for w in windows},
                      live={w: WindowScore(accuracy=0.8, loss=0.4, n=4) for w in windows},
                      base={5: WindowScore(accuracy=0.25, loss=1.4, n=4)},
                      checks=[Check(name=f"drop on window {w}", passed=w > 1, observed=0.3 if w == 1 else 0.0,
                                    threshold=0.05) for w in windows[:-1]],
                      thresholds=GateSettings(), seconds=1.5, live_scores_reused=12, live_scores_computed=8)


# What a listing serves of `five_window_rejection()`.
FIVE_WINDOW_SUMMARY = {"passed": False, "reason": "drop on window 1: 0.300 against threshold 0.050", "test": "",
                       "new_windows": [5], "canary": None, "thresholds": GateSettings().model_dump(), "seconds": 1.5,
                       "live_scores_reused": 12, "live_scores_computed": 8, "checks_passed": 3, "checks_failed": 1}


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


def test_the_update_list_summarizes_gate_reports_and_an_update_serves_its_whole_report(
        serve: Callable[[Settings], LiveService], tmp_path: Path) -> None:
    # The console polls the list every few seconds: per-window scores and checks stay out of it.
    live = serve(tiny_settings(tmp_path, None))
    gate = five_window_rejection()
    updates = live.service.updates.history
    updates.append(UpdateRecord(id=1, trigger="manual", status="skipped", stage="finished", finished_at=1.0,
                                reason="no new labelled records since the live version"))
    updates.append(UpdateRecord(id=2, trigger="records", status="rejected", stage="finished", finished_at=2.0,
                                version="v0001", reason=gate.reason, windows=[5], new_records=40,
                                snapshot_seconds=0.2, gate=gate))
    client = live.client()

    listed = client.get("/v1/updates").json()
    assert [u["id"] for u in listed] == [2, 1] and listed[1]["gate"] is None
    assert listed[0]["gate"] == FIVE_WINDOW_SUMMARY

    whole = client.get("/v1/updates/2")
    assert whole.status_code == 200
    update = whole.json()
    assert {k: v for k, v in update.items() if k != "gate"} == {k: v for k, v in listed[0].items() if k != "gate"}
    assert update["gate"] == json.loads(gate.model_dump_json())
    assert client.get("/v1/updates/1").json() == listed[1]

    refused = client.get("/v1/updates/3")
    assert refused.status_code == 404
    assert refused.json()["detail"] == "no update 3 (the newest `registry.keep_updates` updates are kept)"


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
