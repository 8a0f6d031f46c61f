"""A site's side of a federated round through its HTTP API, as its Flower client calls it: train
from the hub's adapter, gate the hub's candidate on its probes, adopt what the pooled gate passed;
and every bad adapter refused with a 4xx before anything reads it.

Real parts: a uvicorn server, the tiny llama's LoRA adapter trained in the worker process.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load, save

from learners.federated import SiteScores, judge_pooled
from learners.hpo_config import HpoSettings
from learners.privacy import epsilon, mechanism
from service.settings import FederationSettings, Settings
from service.update_manager import STUDY_JOURNAL
from streams.records import TicketRecord
from tests.conftest import TINY_GATE, TINY_TRAIN, LiveService, tiny_settings

LABELS = ("card_arrival", "exchange_rate", "top_up_failed")
QUICK = TINY_TRAIN.model_copy(update={"epochs": 10.0, "threads": 1})


def add_window(live: LiveService, tag: str, labels: tuple[str, ...]) -> None:
    live.service.buffer.add_many([TicketRecord(id=f"{tag}{i}", text=f"my {labels[i % len(labels)]} problem {i}",
                                               label=labels[i % len(labels)]) for i in range(36)])


def octets(client: httpx.Client, url: str, data: bytes, headers: dict[str, str]) -> httpx.Response:
    return client.post(url, content=data, headers={**headers, "Content-Type": "application/octet-stream"},
                       timeout=300)


def test_a_round_trains_from_the_hub_is_gated_on_local_probes_and_adopted(
        serve: Callable[[Settings], LiveService], tmp_path: Path) -> None:
    # A site that searches its own updates' settings trains the hub's adapter as it is in a round.
    live = serve(tiny_settings(tmp_path, None, train=QUICK, gate=TINY_GATE, hpo=HpoSettings(trials=2)))
    client = live.client()
    add_window(live, "a", LABELS[:2])
    answer = client.get("/v1/federation/weights", headers=live.admin)
    assert answer.status_code == 200 and answer.headers["X-Evergreen-Version"] == live.service.registry.live
    start = answer.content

    fitted = octets(client, "/v1/federation/rounds/1/fit", start, live.admin)
    assert fitted.status_code == 200, fitted.text
    reply = fitted.json()
    assert reply["windows"] == [1] and reply["examples"] > 0 and reply["epsilon_spent"] == 0.0
    assert reply["reason"].startswith("contributed: sent to the hub for federated round 1")
    trained = base64.b64decode(reply["weights"])
    assert load(trained).keys() == load(start).keys()
    assert any(not torch.equal(load(trained)[k], load(start)[k]) for k in load(start))
    assert not (live.service.settings.data_dir / STUDY_JOURNAL).exists()  # no search ran
    # Its fit is an update of its own, not a version: nothing registered, nothing promoted.
    assert live.service.registry.names() == [live.service.registry.live]

    evaluated = octets(client, "/v1/federation/rounds/1/evaluate", trained, live.admin)
    assert evaluated.status_code == 200, evaluated.text
    scores = SiteScores.model_validate_json(evaluated.text)
    assert scores.new_windows == [1] and scores.probes > 0
    verdict = judge_pooled([scores], TINY_GATE)
    # One site's pool is its own probes: the hub judges them as the site's gate did.
    record = live.service.updates.history[-1]
    assert record.status == "evaluated" and record.gate is not None
    assert (verdict.passed, verdict.reason) == (record.gate.passed, record.gate.reason)
    assert verdict.passed, verdict.reason
    window = scores.windows("candidate")[1]
    assert window.n == len(window.correct) == len(window.model_scores) and window.labels == LABELS[:2]

    adopted = client.post("/v1/federation/rounds/1/adopt", headers=live.admin, timeout=120,
                          json={"weights": reply["weights"], "gate": verdict.model_dump(mode="json")})
    assert adopted.status_code == 200, adopted.text
    version = adopted.json()["version"]
    assert adopted.json()["status"] == "promoted" and live.service.registry.live == version
    info = live.service.registry.info(version)
    assert info.windows_trained == [1] and info.gate is not None and info.gate.passed
    served = client.get("/v1/federation/weights", headers=live.admin)
    assert served.headers["X-Evergreen-Version"] == version and load(served.content).keys() == load(start).keys()
    assert all(torch.equal(load(served.content)[k], load(trained)[k]) for k in load(trained))
    refused = verdict.model_copy(update={"passed": False, "reason": "window 0 learned beyond chance: 0.5"})
    again = client.post("/v1/federation/rounds/1/adopt", headers=live.admin,
                        json={"weights": reply["weights"], "gate": refused.model_dump(mode="json")})
    assert again.status_code == 409 and "the hub's gate rejected" in again.json()["detail"], again.text
    # The next window's fit learns only what the new live version has not, at the federation's
    # learning rate: scaled to next to nothing, its adapter stays the hub's.
    add_window(live, "b", LABELS[1:])
    live.service.federated_site.settings = FederationSettings(fit_learning_rate_scale=1e-6)
    second = octets(client, "/v1/federation/rounds/2/fit", served.content, live.admin).json()
    assert second["windows"] == [2], second
    still = load(base64.b64decode(second["weights"]))
    assert all(torch.allclose(still[k], load(served.content)[k], atol=1e-5) for k in still)


def test_bad_adapters_and_requests_are_refused_before_anything_reads_them(
        serve: Callable[[Settings], LiveService], tmp_path: Path) -> None:
    live = serve(tiny_settings(tmp_path, None, train=QUICK, gate=TINY_GATE,
                               federation=FederationSettings(max_weights_bytes=4 * 1024 * 1024)))
    client = live.client()
    start = client.get("/v1/federation/weights", headers=live.admin).content
    tensors = load(start)
    name = sorted(tensors)[0]
    poisoned = save({**tensors, name: torch.full_like(tensors[name], math.nan)})
    renamed = save({f"{k}.evil": v for k, v in tensors.items()})
    reshaped = save({**tensors, name: torch.zeros(3, 3)})
    for data, why in ((poisoned, "NaN or infinite"), (renamed, "not the live adapter's tensors"),
                      (reshaped, "the live adapter's is"), (b"\x80\x04pickle", "not a safetensors file")):
        for step in ("fit", "evaluate"):
            answer = octets(client, f"/v1/federation/rounds/1/{step}", data, live.admin)
            assert answer.status_code == 400 and why in answer.json()["detail"], (step, answer.text)
    assert octets(client, "/v1/federation/rounds/1/fit", start, {}).status_code == 401
    assert client.get("/v1/federation/weights").status_code == 401
    too_big = octets(client, "/v1/federation/rounds/1/fit", b"0" * (5 * 1024 * 1024), live.admin)
    assert too_big.status_code == 413, too_big.text
    unknown = octets(client, "/v1/federation/rounds/7/evaluate", start, live.admin)
    assert unknown.status_code == 409 and "no fit of round 7" in unknown.json()["detail"]
    nothing_new = octets(client, "/v1/federation/rounds/1/fit", start, live.admin)
    assert nothing_new.status_code == 200 and nothing_new.json()["examples"] == 0
    assert nothing_new.json()["reason"].startswith("skipped: no new labelled records"), nothing_new.text
    assert nothing_new.json()["weights"] == ""
    assert live.service.registry.names() == [live.service.registry.live]  # nothing of it registered
    with pytest.raises(ValueError, match="no site's scores"):
        judge_pooled([], TINY_GATE)


def test_a_private_site_reports_its_epsilon_and_stops_contributing_when_its_budget_is_spent(
        serve: Callable[[Settings], LiveService], tmp_path: Path) -> None:
    private = QUICK.model_copy(update={"epochs": 3.0, "privacy": QUICK.privacy.model_copy(
        update={"enabled": True, "noise_multiplier": 0.8})})
    one_round = epsilon([mechanism(26, 26, private)], private.privacy.delta)  # of 36 tickets, 10 kept as probes
    budgeted = private.model_copy(update={"privacy": private.privacy.model_copy(
        update={"epsilon_budget": 1.1 * one_round})})
    live = serve(tiny_settings(tmp_path, None, train=budgeted, gate=TINY_GATE))
    client = live.client()
    start = client.get("/v1/federation/weights", headers=live.admin).content
    add_window(live, "a", LABELS[:2])
    first = octets(client, "/v1/federation/rounds/1/fit", start, live.admin).json()
    assert first["examples"] == 26 and first["epsilon_spent"] == pytest.approx(one_round), first
    assert client.get("/v1/privacy").json()["rounds"] == 1
    add_window(live, "b", LABELS[1:])
    second = octets(client, "/v1/federation/rounds/2/fit", start, live.admin).json()
    assert second["examples"] == 0 and second["weights"] == "", second
    assert second["reason"].startswith("skipped: privacy budget spent"), second
    assert second["epsilon_spent"] == pytest.approx(one_round)
