"""Concurrent classify requests are scored together and answered as if one by one."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import httpx

from conftest import LiveService, tiny_settings
from service.settings import Settings

LABELS = ["card arrival", "exchange rate", "top up failed", "lost or stolen card"]
TEXTS = [f"ticket {i}: {'my card ' * (i % 4)}please help" for i in range(16)]


def test_concurrent_requests_are_batched_with_unchanged_answers(serve: Callable[[Settings], LiveService],
                                                                tmp_path: Path) -> None:
    live = serve(tiny_settings(tmp_path, None))
    with live.client() as client:
        alone = [client.post("/v1/classify", json={"text": t, "labels": LABELS, "top_k": 4}).json() for t in TEXTS]
    assert live.service.batcher.batches == len(TEXTS)  # sequential requests never wait for company

    together: list[dict[str, object]] = [{} for _ in TEXTS]

    def ask(worker: int) -> None:
        with httpx.Client(base_url=live.url, timeout=60) as http:
            for i in range(worker, len(TEXTS), 8):
                together[i] = http.post("/v1/classify", json={"text": TEXTS[i], "labels": LABELS,
                                                              "top_k": 4}).json()

    threads = [threading.Thread(target=ask, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    batcher = live.service.batcher
    assert batcher.requests == 2 * len(TEXTS) and batcher.batches < 2 * len(TEXTS)  # some ran together
    for one, many in zip(alone, together, strict=True):
        assert one["label"] == many["label"] and one["adapter_version"] == many["adapter_version"]
        assert abs(one["confidence"] - many["confidence"]) < 1e-4  # type: ignore[operator]
