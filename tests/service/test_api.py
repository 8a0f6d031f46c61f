"""The HTTP contract: auth scopes, bounded bodies, clear 4xx messages (real uvicorn server).

What one router answers is tested beside it, in tests/service/routes/."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from service.settings import ApiKey, ApiSettings, Settings
from streams.broker import free_port
from streams.records import TicketRecord
from tests.conftest import LiveService, tiny_settings


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
