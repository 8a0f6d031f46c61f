"""`/v1/updates`: a paged list that summarizes gate reports, and one update with its whole report
(real uvicorn server). Updates themselves are tested in tests/service/test_update_manager.py."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from service.settings import Settings
from service.update_log import UpdateRecord
from tests.conftest import LiveService, tiny_settings
from tests.service.routes.conftest import FIVE_WINDOW_SUMMARY, five_window_rejection


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


def test_the_update_list_is_paged(serve: Callable[[Settings], LiveService], tmp_path: Path) -> None:
    """Issue 13: `GET /v1/updates` returned every update since start."""
    live = serve(tiny_settings(tmp_path, None))
    client = live.client()
    for _ in range(5):  # nothing to learn: each is skipped at once
        assert client.post("/v1/updates", headers=live.admin).status_code == 202
        live.service.updates.cancel_and_wait(30)
    assert [u["id"] for u in client.get("/v1/updates").json()] == [5, 4, 3, 2, 1]
    assert [u["id"] for u in client.get("/v1/updates", params={"limit": 2}).json()] == [5, 4]
    assert [u["id"] for u in client.get("/v1/updates", params={"limit": 2, "before": 4}).json()] == [3, 2]
    assert client.get("/v1/updates", params={"before": 1}).json() == []
    for bad in ({"limit": 0}, {"limit": 201}, {"before": 0}):
        assert client.get("/v1/updates", params=bad).status_code == 422, bad
