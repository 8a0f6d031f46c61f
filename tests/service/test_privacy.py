"""Differentially private updates as a user runs them: each round entered in the ledger before it
trains, ε in `/v1/privacy` and `/metrics`, an update the budget cannot pay for refused with the
reason, and the spend kept across a restart (a line torn by a crash cut off, any other refused).

Real parts: a uvicorn server, the tiny llama's LoRA adapter trained with Opacus in the worker
process, the console in Chromium.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from playwright.sync_api import Browser, expect
from pydantic import ValidationError

from learners.config import PROMOTE_ALL
from learners.hpo_config import HpoSettings
from learners.privacy import epsilon, mechanism
from service.core import Service
from service.privacy import LEDGER_FILE, PrivacyLedger
from service.settings import Settings
from streams.records import TicketRecord
from tests.conftest import TINY_TRAIN, LiveService, gauge, open_console, tiny_settings, wait_for

PRIVATE = TINY_TRAIN.model_copy(update={
    "threads": 1, "epochs": 3.0, "min_new_epochs": 1.0,
    "privacy": TINY_TRAIN.privacy.model_copy(update={"enabled": True, "noise_multiplier": 0.8})})
TRAINED = 28  # of a window of 40 tickets: the buffer keeps the others as the gate's probes
ONE_ROUND = epsilon([mechanism(TRAINED, TRAINED, PRIVATE)], PRIVATE.privacy.delta)


def add_window(service: Service, tag: str) -> None:
    service.buffer.add_many([TicketRecord(id=f"{tag}{i}", text=f"my {'card' if i % 2 else 'rate'} issue {i}",
                                          label=("card_arrival", "exchange_rate")[i % 2]) for i in range(40)])


def update(live: LiveService) -> dict[str, object]:
    client = live.client()
    update_id = client.post("/v1/updates", headers=live.admin).json()["id"]
    wait_for(lambda: client.get(f"/v1/updates/{update_id}").json()["stage"] == "finished", 180, "the update")
    return client.get(f"/v1/updates/{update_id}").json()


def test_each_round_is_accounted_and_the_budget_refuses_the_one_it_cannot_pay(
        serve: Callable[[Settings], LiveService], browser: Browser, tmp_path: Path) -> None:
    budgeted = PRIVATE.model_copy(update={"privacy": PRIVATE.privacy.model_copy(
        update={"epsilon_budget": 1.1 * ONE_ROUND})})  # a second round adds 14-28 %
    settings = tiny_settings(tmp_path, None, train=budgeted, gate=PROMOTE_ALL)
    live = serve(settings)
    add_window(live.service, "a")
    first = update(live)
    assert first["status"] == "promoted" and first["new_records"] == TRAINED, first
    status = live.client().get("/v1/privacy").json()
    planned = mechanism(TRAINED, TRAINED, budgeted).model_dump()
    assert status["rounds"] == 1 and [r["round"] for r in status["recent"]] == [planned]
    assert status["recent"][0]["update"] == first["id"]
    assert status["epsilon_spent"] == pytest.approx(ONE_ROUND) and status["refused"] is None
    trained = live.service.registry.info(first["version"]).train
    assert trained is not None and trained.privacy is not None
    assert trained.privacy.model_dump() == planned  # what the worker ran is what was entered
    # The service's first version, and so every later one, has the private adapter's few weights.
    adapter = json.loads((live.service.registry.path(first["version"]) / "adapter_config.json").read_text())
    assert adapter["r"] == 1 and sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    metrics = live.client().get("/metrics").text
    assert gauge(metrics, 'evergreen_privacy_epsilon{kind="spent"}') == pytest.approx(ONE_ROUND)

    add_window(live.service, "b")
    second = update(live)
    assert second["status"] == "skipped" and second["reason"].startswith("privacy budget spent"), second
    assert second["version"] is None and live.service.registry.live == first["version"]
    status = live.client().get("/v1/privacy").json()
    assert status["rounds"] == 1 and status["refused"] == second["reason"]
    errors: list[str] = []
    page = open_console(browser, live.url, errors)
    expect(page.locator("#privacy-figures")).to_contain_text("spent: updates refused")
    expect(page.locator("#privacy-figures")).to_contain_text(f"ε spent{ONE_ROUND:.2f}")
    assert not errors, errors

    # A crash mid-write leaves a torn last line: cut off at the next start, the spend as it was.
    ledger = live.service.registry.root / LEDGER_FILE
    with ledger.open("a") as torn:
        torn.write('{"update": 9, "at": 1.0, "rou')
    # A replica reads past it and leaves the file alone (it may be the primary's entry being written).
    assert PrivacyLedger(ledger, budgeted.privacy, repair=False).spent == pytest.approx(ONE_ROUND)
    assert ledger.read_text().endswith('"rou')
    assert PrivacyLedger(ledger, budgeted.privacy).spent == pytest.approx(ONE_ROUND)
    assert ledger.read_text().endswith("}\n") and len(ledger.read_text().splitlines()) == 1
    # Any other line that is not an entry stops the service: ε cannot be known without it.
    ledger.write_text('{"update": 9}\n' + ledger.read_text())
    with pytest.raises(ValueError, match="line 1 of the privacy ledger"):
        PrivacyLedger(ledger, budgeted.privacy)


def test_privacy_with_a_search_is_refused_at_load() -> None:
    with pytest.raises(ValidationError, match="`train.privacy.enabled` needs `hpo.trials` 0 or 1"):
        Settings(train=PRIVATE, hpo=HpoSettings(trials=4))
