"""Concurrent classify requests are scored together and answered as if one by one."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from service.settings import ServingSettings, Settings
from tests.conftest import LiveService, classify_concurrently, gauge, tiny_settings, wait_for

LABELS = ["card arrival", "exchange rate", "top up failed", "lost or stolen card"]
TEXTS = [f"ticket {i}: {'my card ' * (i % 4)}please help" for i in range(16)]


def test_concurrent_requests_are_batched_with_unchanged_answers(serve: Callable[[Settings], LiveService],
                                                                tmp_path: Path) -> None:
    live = serve(tiny_settings(tmp_path, None))
    with live.client() as client:
        alone = [client.post("/v1/classify", json={"text": t, "labels": LABELS, "top_k": 4}).json() for t in TEXTS]
    assert live.service.batcher.batches == len(TEXTS)  # sequential requests never wait for company

    together = classify_concurrently(live.url, [{"text": t, "labels": LABELS, "top_k": 4} for t in TEXTS], 8)
    batcher = live.service.batcher
    assert batcher.requests == 2 * len(TEXTS) and batcher.batches < 2 * len(TEXTS)  # some ran together
    for one, many in zip(alone, together, strict=True):
        assert one["label"] == many["label"] and one["adapter_version"] == many["adapter_version"]
        assert abs(one["confidence"] - many["confidence"]) < 1e-4  # type: ignore[operator]


WORDS = "card arrival exchange rate top up failed lost stolen pin blocked transfer pending refund cash fee".split()


def long_labels(n: int) -> list[str]:
    """Distinct labels of 128 characters, as the issue's request had."""
    rng = random.Random(0)
    return [f"{i} {' '.join(rng.choice(WORDS) for _ in range(40))}"[:128] for i in range(n)]


def test_a_request_over_the_work_budget_is_refused_at_once(serve: Callable[[Settings], LiveService],
                                                           tmp_path: Path) -> None:
    """Issue 13: 16,380 characters and 512 labels of 128 passed validation and held the model 31 s."""
    live = serve(tiny_settings(tmp_path, None))
    client = live.client()
    started = time.monotonic()
    huge = client.post("/v1/classify", json={"text": "my card has not arrived " * 682, "labels": long_labels(512)})
    assert huge.status_code == 413 and time.monotonic() - started < 5
    assert "`serving.max_classify_tokens`" in huge.json()["detail"]
    assert client.post("/v1/classify", json={"text": "my card", "labels": long_labels(100)}).status_code == 200


def test_a_small_request_is_not_stuck_behind_a_large_one(serve: Callable[[Settings], LiveService],
                                                         tmp_path: Path) -> None:
    live = serve(tiny_settings(tmp_path, None, serving=ServingSettings(max_classify_tokens=10_000,
                                                                       turn_tokens=256)))
    done: dict[str, float] = {}

    def large() -> None:
        with httpx.Client(base_url=live.url, timeout=120) as http:
            answer = http.post("/v1/classify", json={"text": "where is my card", "labels": long_labels(300)})
            assert answer.status_code == 200
        done["large"] = time.monotonic()

    started = time.monotonic()
    thread = threading.Thread(target=large)
    thread.start()
    with live.client() as scraper:
        wait_for(lambda: gauge(scraper.get("/metrics").text, "evergreen_classify_in_progress") == 1, 30,
                 "the large request to hold the model")
    asked = time.monotonic()
    with live.client() as client:
        small = client.post("/v1/classify", json={"text": "where is my card", "labels": LABELS})
    done["small"] = time.monotonic()
    thread.join(timeout=120)
    assert small.status_code == 200 and "large" in done
    waited, large_took = done["small"] - asked, done["large"] - started
    assert done["small"] < done["large"] and waited < large_took / 3, (waited, large_took)
