"""The probes and `/metrics` over real HTTP. Ingest health: a stall (records wait, nothing is
committed) turns `GET /healthz/ingest` into a 503, the buffer summary and the metrics say so, and
it clears once ingestion moves again (issue 13: the ingester looped for ever while every health
signal was green). The metrics: updates, gate verdicts and the live version's accuracy."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from learners.config import GateSettings
from learners.reports import GateReport, WindowScore
from replay.buffer import ReplayBuffer
from service.settings import Settings
from streams.broker import LocalBroker
from streams.records import TicketRecord
from tests.conftest import LiveService, add_versions, tiny_settings, wait_for


class BrokenDisk:
    """The service's own buffer behind a switch that makes every write fail, as a full disk would."""

    def __init__(self, buffer: ReplayBuffer) -> None:
        self.buffer = buffer
        self.failing = True

    def add_many(self, records: Sequence[TicketRecord]) -> None:
        if self.failing:
            raise OSError("No space left on device")
        self.buffer.add_many(records)


def test_a_stall_is_reported_and_clears(broker: LocalBroker, serve: Callable[[Settings], LiveService],
                                        tmp_path: Path) -> None:
    settings = tiny_settings(tmp_path, broker.bootstrap)
    settings.kafka.stall_after_s = 2.0
    live = serve(settings)
    client = live.client()
    ingester = live.service.ingester
    assert ingester is not None
    wait_for(lambda: client.get("/healthz/ingest").json()["status"] == "ok", 30, "a healthy ingester")
    disk = BrokenDisk(live.service.buffer)
    ingester.sink = disk

    tickets = [{"id": f"h-{i}", "text": f"where is my card {i}"} for i in range(5)]
    assert client.post("/v1/tickets", json=tickets, headers=live.admin).status_code == 202
    wait_for(lambda: client.get("/healthz/ingest").status_code == 503, 30, "the stall to be reported")
    health = client.get("/healthz/ingest").json()
    assert health["status"] == "stalled" and health["seconds_since_progress"] > 2.0
    ingest = client.get("/v1/buffer").json()["ingest"]
    assert ingest["stalled"] and ingest["total_lag"] == 5
    assert "evergreen_ingest_stalled 1.0" in client.get("/metrics").text
    ready = client.get("/readyz")  # serving is unaffected: the instance stays ready
    assert ready.status_code == 200 and ready.json()["ingest"] == "stalled"

    disk.failing = False
    wait_for(lambda: client.get("/healthz/ingest").status_code == 200, 60, "ingestion to move again")
    assert client.get("/v1/buffer").json()["records"] == 5
    assert "evergreen_ingest_stalled 0.0" in client.get("/metrics").text


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
