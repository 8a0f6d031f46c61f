"""Ingest health over real HTTP: a stall (records wait, nothing is committed) turns
`GET /healthz/ingest` into a 503, the buffer summary and the metrics say so, and it clears once
ingestion moves again. Issue 13: the ingester looped for ever while every health signal was green."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from replay.buffer import ReplayBuffer
from service.settings import Settings
from streams.broker import LocalBroker
from streams.records import TicketRecord
from tests.conftest import LiveService, tiny_settings, wait_for


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
