"""Blue/green under load: promotions while clients keep asking, over real HTTP."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path

import httpx

from service.settings import Settings
from tests.conftest import LiveService, add_versions, tiny_settings, wait_for

LABELS = ["card arrival", "exchange rate"]


def number(version: str) -> int:
    return int(version[1:])


def test_ten_promotions_under_four_clients(serve: Callable[[Settings], LiveService], tmp_path: Path) -> None:
    live = serve(tiny_settings(tmp_path, None))
    versions = add_versions(live.service.registry, 10, LABELS)
    stop = threading.Event()
    seen: list[list[str]] = [[] for _ in range(4)]
    failures: list[str] = []

    def client(index: int) -> None:
        with httpx.Client(base_url=live.url, timeout=60) as http:
            while not stop.is_set():
                if index % 2:  # two clients classify, two stream chat answers
                    response = http.post("/v1/classify", json={"text": f"my card {index}", "labels": LABELS})
                    ok = response.status_code == 200
                    version = response.json()["adapter_version"] if ok else ""
                else:
                    with http.stream("POST", "/v1/chat/completions", json={
                            "model": "live", "messages": [{"role": "user", "content": "hi"}],
                            "max_tokens": 6, "stream": True}) as response:
                        ok = response.status_code == 200
                        chunks = [json.loads(line[6:]) for line in response.iter_lines()
                                  if line.startswith("data: {")]
                    version = response.headers.get("x-evergreen-adapter-version", "")
                    if {c["model"] for c in chunks} != {version}:
                        failures.append(f"one stream from several versions: {version}, {chunks}")
                if not ok:
                    failures.append(f"{response.status_code}: {response.read()!r}")
                else:
                    seen[index].append(version)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    try:
        with live.client() as admin:
            for version in versions:
                answered = sum(map(len, seen))
                promoted = admin.post(f"/v1/adapters/{version}/promote", headers=live.admin)
                assert promoted.status_code == 200, promoted.text
                # Let every client get answers from this version before the next promotion.
                wait_for(lambda n=answered + 8: sum(map(len, seen)) >= n or bool(failures), 30,
                         f"answers after promoting {version}")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)

    assert failures == []
    for answers in seen:
        assert answers, "a client got no answers"
        numbers = [number(v) for v in answers]
        assert numbers == sorted(numbers), f"a client went back in versions: {answers}"
    assert {v for answers in seen for v in answers} >= set(versions)
    assert live.service.runtime.version == versions[-1] == live.service.registry.live
    # Replaced versions are released: the live one plus at most `serving.cached_versions` stay.
    attached = live.service.runtime.attached()
    assert attached[0] == versions[-1] and len(attached) <= 1 + live.service.settings.serving.cached_versions
