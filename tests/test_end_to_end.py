"""A ticket produced to Kafka ends up changing the answers of the live endpoint, after a gate.

Real parts throughout: Tansu broker over TCP, kafka-python, MiniLM embeddings in FAISS, a
llama (tiny, random) with a PEFT LoRA adapter, uvicorn serving FastAPI, httpx over HTTP.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

from kafka import KafkaConsumer

from service.settings import SchedulerSettings, Settings
from streams.broker import LocalBroker
from streams.produce import TicketProducer
from streams.records import TicketRecord
from tests.conftest import LiveService, tiny_settings, wait_for

KEYWORDS = {"card_arrival": "card", "exchange_rate": "rate",
            "top_up_failed": "topup", "lost_or_stolen_card": "stolen"}
WINDOW_1 = ["card_arrival", "exchange_rate"]
WINDOW_2 = ["top_up_failed", "lost_or_stolen_card"]


def window_tickets(window: int, labels: list[str], n: int) -> list[bytes]:
    rng = random.Random(window)
    return [TicketRecord(id=f"w{window}-{i}", label=labels[i % len(labels)],
                         text=f"{rng.choice(['hello', 'hi', 'please'])} my {KEYWORDS[labels[i % len(labels)]]}"
                              f" issue {rng.randint(0, 99)}").model_dump_json().encode()
            for i in range(n)]


def finished(client: object, update_id: int) -> Callable[[], bool]:
    def check() -> bool:
        return client.get(f"/v1/updates/{update_id}").json()["status"] != "running"  # type: ignore[attr-defined]
    return check


def test_tickets_flow_through_gate_to_served_answers(
    broker: LocalBroker, serve: Callable[[Settings], LiveService], tmp_path: Path
) -> None:
    settings = tiny_settings(tmp_path, broker.bootstrap,
                             scheduler=SchedulerSettings(enabled=True, check_seconds=1, min_new_records=100))
    live = serve(settings)
    client = live.client()
    assert client.get("/v1/adapters").json()["live"] == "v0000"

    # Window 1, plus one malformed message, produced to the real broker; updated on demand at
    # once, as `evergreen produce` then `evergreen update` would: the update waits for the ingester.
    producer = TicketProducer(broker.bootstrap, settings.kafka.topic)
    sent = producer.send_all([*window_tickets(1, WINDOW_1, 60), b'{"id": "broken", "text": 42}'])
    assert sent == 61
    started = client.post("/v1/updates", headers=live.admin)
    assert started.status_code == 202
    update_id = started.json()["id"]
    wait_for(finished(client, update_id), 240, "the first update")
    first = client.get(f"/v1/updates/{update_id}").json()
    assert first["status"] == "promoted", first
    assert first["ingest_caught_up"] is True and first["windows"] == [1]
    assert client.get("/v1/buffer").json()["records"] == 60
    assert first["gate"]["passed"] and "1" in first["gate"]["candidate"]
    adapters = client.get("/v1/adapters").json()
    assert adapters["live"] == "v0001"
    assert adapters["adapters"][1]["parent"] == "v0000"
    forgetting = client.get("/v1/forgetting").json()
    assert forgetting["windows"] == [1] and forgetting["live"] == "v0001"
    v1 = next(v for v in forgetting["versions"] if v["name"] == "v0001")
    assert v1["accuracy"]["1"] == first["gate"]["candidate"]["1"]["accuracy"]
    assert v1["summary"]["average_accuracy"] == v1["accuracy"]["1"]
    shortfall = next(c for c in first["gate"]["checks"] if c["name"] == "new windows worse than live")
    assert v1["summary"]["plasticity"] == -shortfall["observed"]  # gain over v0000
    answer = client.post("/v1/classify", json={"text": "hello my card issue 7"}).json()
    assert answer["adapter_version"] == "v0001"
    assert answer["label"] in WINDOW_1

    # Window 2 through the scheduler: it fires once the open window holds 100 records (exactly
    # what is sent, so the window, and with it the seeded update, is the same on every run).
    producer.send_all(window_tickets(2, WINDOW_2, 100))
    wait_for(lambda: any(u["trigger"] == "records" and u["status"] != "running"
                         for u in client.get("/v1/updates").json()), 300, "the scheduled update")
    listed = next(u for u in client.get("/v1/updates").json() if u["trigger"] == "records")
    second = client.get(f"/v1/updates/{listed['id']}").json()  # the list holds a summary of the gate report
    assert second["status"] == "promoted" and second["version"] == "v0002", second
    assert "drop on window 1" in {c["name"] for c in second["gate"]["checks"]}  # gated against window 1
    served = client.post("/v1/classify", json={"text": "please my stolen issue 3", "top_k": 4}).json()
    assert served["adapter_version"] == client.get("/v1/adapters").json()["live"] == "v0002"
    assert {t["label"] for t in served["top"]} == set(WINDOW_1 + WINDOW_2)

    # The malformed message went to the dead-letter topic, with its reason and origin.
    consumer = KafkaConsumer(settings.kafka.dlq_topic, bootstrap_servers=broker.bootstrap,
                             auto_offset_reset="earliest", consumer_timeout_ms=10_000)
    dead = [json.loads(m.value) for m in consumer]
    consumer.close()
    assert len(dead) == 1
    assert dead[0]["reason"] == "invalid_fields" and "`text`" in dead[0]["detail"]
    assert dead[0]["topic"] == settings.kafka.topic
    assert client.get("/v1/buffer").json()["dead_lettered"] == {"invalid_fields": 1}
    producer.close()
