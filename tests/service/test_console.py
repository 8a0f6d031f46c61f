"""The web console in real headless Chromium (Debian's), against a real service: Tansu broker,
MiniLM + FAISS buffer, the tiny llama with LoRA, uvicorn. Updates really train and gate.

The full-page screenshots land in `docs/img/*.tmp.png` (ignored by git); the README shows copies.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from playwright.sync_api import Browser, Page, expect

from learners.config import GateSettings
from learners.gate import judge
from learners.reports import ReplyScore, SearchReport, TrialReport, WindowScore
from replay.config import ReplaySettings
from service.settings import DEV_ADMIN_KEY, Settings
from service.update_log import UpdateRecord
from streams.broker import LocalBroker
from streams.produce import TicketProducer
from tests.conftest import TINY_TRAIN, LiveService, add_versions, open_console, tiny_settings, wait_for
from tests.test_end_to_end import WINDOW_1, WINDOW_2, window_tickets

SHOTS = Path(__file__).resolve().parents[2] / "docs" / "img"
UPDATE_TIMEOUT_MS = 240_000


def js_percent(share: float) -> str:
    """A share as the console writes it (`Charts.pct`): JS's Math.round rounds halves up, where
    Python's round() goes to the even neighbour (62.5 % reads 63 %, not 62 %)."""
    return f"{math.floor(share * 100 + 0.5)}%"


def produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = TicketProducer(bootstrap, topic)
    assert producer.send_all(values) == len(values)
    producer.close()


def stored(client: httpx.Client, count: int) -> None:
    """Wait until the ingester handed `count` valid records to the buffer in all."""
    wait_for(lambda: (client.get("/v1/buffer").json()["ingest"] or {}).get("stored") == count, 60,
             f"{count} records stored")


def trigger_and_wait(page: Page, version: str) -> None:
    page.click("#trigger-update")
    expect(page.locator("#message")).to_contain_text("Update #")
    expect(page.locator(f'#timeline [data-name="{version}"]')).to_be_visible(timeout=UPDATE_TIMEOUT_MS)


def test_console_watches_forgetting_and_steers_updates(
        broker: LocalBroker, serve: Callable[[Settings], LiveService], browser: Browser, tmp_path: Path) -> None:
    # The console shows what the updates did, not how well the tiny model learns: a third of the epochs.
    settings = tiny_settings(tmp_path, broker.bootstrap, replay=ReplaySettings(near_duplicate_cosine=0.999),
                             train=TINY_TRAIN.model_copy(update={"epochs": 10}))
    live = serve(settings)
    client = live.client()
    errors: list[str] = []
    page = open_console(browser, live.url, errors)

    # Window 1 over Kafka, with a malformed message (dead-lettered) and a ticket carrying PII.
    pii = json.dumps({"id": "pii", "label": WINDOW_1[0], "text": "my card issue, write to jo@example.com"})
    window1 = [*window_tickets(1, WINDOW_1, 60), pii.encode(), b'{"id": "broken", "text": 42}']
    produce(broker.bootstrap, settings.kafka.topic, window1)
    stored(client, len(window1) - 1)

    # Before any version has learned a label, the playground answers zero-shot and says so.
    page.fill("#ticket", "hello my card issue 3")
    page.click("#classify")
    expect(page.locator("#answer-source")).to_contain_text("zero-shot")
    expect(page.locator("#privacy-figures")).to_be_hidden()  # updates are not private here

    page.fill("#admin-key", DEV_ADMIN_KEY)
    page.click("#key-save")
    expect(page.locator("#key-state")).to_have_text("key set for this tab")
    page.click("#trigger-update")
    # Progress is shown while the update runs (step, loss, ETA), then the new version appears.
    expect(page.locator("#progress-figures")).to_contain_text(re.compile(r"step\d+ / \d+"), timeout=UPDATE_TIMEOUT_MS)
    page.locator("#update").screenshot(path=str(SHOTS / "console-update.tmp.png"))
    expect(page.locator('#timeline [data-name="v0001"]')).to_be_visible(timeout=UPDATE_TIMEOUT_MS)
    expect(page.locator("#progress-figures")).to_contain_text("ETA")
    wait_for(lambda: client.get("/v1/updates/1").json()["status"] != "running", 120, "update 1 settled")
    first = client.get("/v1/updates/1").json()
    assert first["stage"] == "finished" and first["progress"]["step"] == first["progress"]["steps"]
    assert first["progress"]["eta_s"] == 0  # measured from the pace of the steps; none were left

    # Windows 2 and 3 (new intents, then window 1's intents again): one click each.
    produce(broker.bootstrap, settings.kafka.topic, window_tickets(2, WINDOW_2, 60))
    stored(client, len(window1) - 1 + 60)
    trigger_and_wait(page, "v0002")
    produce(broker.bootstrap, settings.kafka.topic, window_tickets(3, WINDOW_1, 60))
    stored(client, len(window1) - 1 + 120)
    trigger_and_wait(page, "v0003")
    wait_for(lambda: all(u["status"] != "running" for u in client.get("/v1/updates").json()), 120, "updates done")

    # The heatmap has one cell per version and window of the served matrix, coloured where measured.
    forgetting = client.get("/v1/forgetting").json()
    assert forgetting["windows"] == [1, 2, 3]
    versions = forgetting["versions"]
    cells = page.locator("#heatmap .cell")
    expect(cells).to_have_count(len(versions) * len(forgetting["windows"]))
    expect(page.locator("#heatmap .cell.measured")).to_have_count(sum(len(v["accuracy"]) for v in versions))
    newest = versions[-1]
    cell = page.locator(f'#heatmap .cell[data-version="{newest["name"]}"][data-window="1"]')
    expect(cell).to_contain_text(js_percent(newest["accuracy"]["1"]))
    expect(page.locator("#window-lines path.series")).to_have_count(3)
    expect(page.locator("#summary-lines path.series")).to_have_count(3)

    # The timeline names every version with its verdict; a click opens its gate report.
    adapters = client.get("/v1/adapters").json()
    assert [a["name"] for a in adapters["adapters"]] == ["v0000", "v0001", "v0002", "v0003"]
    expect(page.locator("#live-version")).to_have_text(adapters["live"])
    live_info = next(a for a in adapters["adapters"] if a["live"])
    assert adapters["live_since"] >= live_info["created_at"]
    # The listing summarizes each report; the selected version's whole report is fetched.
    page.click('#timeline [data-name="v0002"]')
    listed = next(a for a in adapters["adapters"] if a["name"] == "v0002")["gate"]
    assert "candidate" not in listed and "checks" not in listed
    gate = client.get("/v1/adapters/v0002").json()["gate"]
    expect(page.locator("#gate .reason")).to_have_text(listed["reason"])
    scores = page.locator("#gate table.list").nth(0).locator("tr")
    expect(scores).to_have_count(len(gate["candidate"]) + 1)
    for row, (window, score) in enumerate(sorted(gate["candidate"].items(), key=lambda item: int(item[0])), 1):
        cells = scores.nth(row).locator("td")
        expect(cells.nth(0)).to_have_text(re.compile(rf"^{window}( \(new\))?$"))
        expect(cells.nth(1)).to_have_text(js_percent(score["accuracy"]))
    expect(page.locator("#gate table.list").nth(1).locator("tr")).to_have_count(len(gate["checks"]) + 1)

    # The buffer card shows what the API counts: per label, duplicates, PII, dead letters, lag.
    buffer = client.get("/v1/buffer").json()
    assert buffer["redactions"] and buffer["dead_lettered"] == {"invalid_fields": 1}
    assert buffer["ingest"]["lag"] and buffer["ingest"]["total_lag"] == 0
    figures = page.locator("#buffer-figures")
    expect(figures).to_contain_text(f"records{buffer['records']}")
    expect(figures).to_contain_text(f"duplicates dropped{buffer['duplicates_dropped']}")
    expect(page.locator("#labels .bar-row")).to_have_count(len(buffer["labels"]))
    expect(page.locator("#dead-letters")).to_contain_text("invalid_fields")
    expect(page.locator("#redactions .bar-row")).to_have_count(len(buffer["redactions"]))
    expect(page.locator("#lag .bar-row")).to_have_count(len(buffer["ingest"]["lag"]))

    # The playground asks the live version.
    page.fill("#ticket", "hello my topup issue 12")
    page.click("#classify")
    expect(page.locator("#answer-label")).to_have_text(
        client.post("/v1/classify", json={"text": "hello my topup issue 12", "top_k": 5}).json()["label"])
    expect(page.locator("#answer-source")).to_contain_text(f"answered by {adapters['live']}")
    page.click("#reply")
    expect(page.locator("#answer-reply")).to_be_visible(timeout=60_000)

    expect(page.locator("#gate")).to_be_visible()  # the screenshot shows v0002's gate report
    page.screenshot(path=str(SHOTS / "console.tmp.png"), full_page=True)
    assert errors == []


def test_actions_are_refused_without_the_admin_key(
        serve: Callable[[Settings], LiveService], browser: Browser, tmp_path: Path) -> None:
    live = serve(tiny_settings(tmp_path, None))
    errors: list[str] = []
    page = open_console(browser, live.url, errors)
    expect(page.locator("#key-state")).to_have_text("no key: read-only")

    page.click("#trigger-update")
    message = page.locator("#message")
    expect(message).to_contain_text("Refused (401)")
    expect(message).to_contain_text("Enter the admin key")
    page.click("#rollback")
    expect(message).to_contain_text("Roll back: Refused (401)")
    page.click('#timeline [data-name="v0000"]')
    expect(page.locator("#gate")).to_contain_text("never judged")

    page.fill("#admin-key", "not-the-key")  # a wrong key is refused the same way
    page.click("#key-save")
    page.click("#trigger-update")
    expect(message).to_contain_text("unknown API key")

    client = live.client()
    assert client.get("/v1/updates").json() == []  # nothing started
    assert client.get("/v1/adapters").json()["live"] == "v0000"
    # The only errors the browser logged are the refused requests themselves.
    assert errors and all("401" in e for e in errors), errors
    page.screenshot(path=str(SHOTS / "console-refused.tmp.png"))


def test_a_gate_report_shows_the_earlier_windows_replies(serve: Callable[[Settings], LiveService],
                                                         browser: Browser, tmp_path: Path) -> None:
    """Issue 14: where tickets carry replies, the gate report shows them beside the label scores."""
    live = serve(tiny_settings(tmp_path, None))
    scores = {1: WindowScore(accuracy=0.75, loss=0.4, n=4), 2: WindowScore(accuracy=1.0, loss=0.1, n=4)}
    replies = ({1: ReplyScore(n=8, loss=0.812, answered=6, rouge_l=0.4, rouges=(0.1, 0.2, 0.5, 0.8, 0.3, 0.5))},
               {1: ReplyScore(n=8, loss=0.5, answered=6, rouge_l=0.9, rouges=(0.9,) * 6)})
    gate = judge(scores, scores, [2], GateSettings(require_learning=False), replies=replies)
    [name] = add_versions(live.service.registry, 1, ["card_arrival"], gate=gate, verdict="rejected")
    errors: list[str] = []
    page = open_console(browser, live.url, errors)
    page.click(f'#timeline [data-name="{name}"]')
    rows = page.locator("#gate table.replies tr")
    expect(rows).to_have_count(2)
    expect(rows.nth(1).locator("td")).to_have_text(["1", "0.400", "0.900", "0.812", "0.500", "6 / 8"])
    expect(page.locator("#gate .reason")).to_contain_text("reply ROUGE-L drop")
    assert not errors, errors


def test_the_updates_card_charts_the_search_trials_and_winners(serve: Callable[[Settings], LiveService],
                                                               browser: Browser, tmp_path: Path) -> None:
    """Issue 15: each update's search, its trials (a pruned one hollow) and its winner, in the console."""
    live = serve(tiny_settings(tmp_path, None))
    for update, values in enumerate([(0.5, 0.75, 0.25), (0.6, 0.9, 0.8)], 1):
        trials = [TrialReport(number=3 * (update - 1) + n, params={"learning_rate": 1e-3, "rank": 8}, value=v,
                              loss=1.0, steps=8, seconds=1.0, pruned=n == 2, winner=n == 1)
                  for n, v in enumerate(values)]
        live.service.updates.history.append(UpdateRecord(
            id=update, trigger="manual", status="promoted", stage="finished", finished_at=time.time(),
            search=SearchReport(metric="label_probability", validation_rows=12, trials=trials, winner=trials[1].params,
                                seconds=3.0)))
    errors: list[str] = []
    page = open_console(browser, live.url, errors)
    expect(page.locator("#search-caption")).to_have_text(
        "Update #2: 3 trials, mean label probability on 12 held-out training rows (hollow: pruned); "
        "winner #4: learning_rate 1.0e-3, rank 8")
    expect(page.locator("#search-trials circle")).to_have_count(3)
    expect(page.locator('#search-trials circle[fill="#fff"]')).to_have_count(1)  # the pruned trial
    expect(page.locator("#search-winners circle title")).to_have_text(
        ["winner's validation score at #1: 75%", "winner's validation score at #2: 90%"])
    page.locator("#update").screenshot(path=str(SHOTS / "console-search.tmp.png"))
    assert not errors, errors
