"""Two instances on one machine: a primary and a serve-only replica sharing the registry,
promotions carried by a real broker."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from learners.reports import WindowScore
from service.core import Service
from service.settings import ReplicaSettings, Settings
from streams.broker import LocalBroker
from tests.conftest import LiveService, add_versions, tiny_settings, wait_for

LABELS = ["card arrival", "exchange rate"]


def test_replica_follows_promotions_and_rollbacks(broker: LocalBroker, serve: Callable[[Settings], LiveService],
                                                  tmp_path: Path) -> None:
    registry = tmp_path / "shared-registry"
    primary = serve(tiny_settings(tmp_path / "primary", broker.bootstrap, registry_dir=registry))
    versions = add_versions(primary.service.registry, 2, LABELS)
    replica = serve(tiny_settings(tmp_path / "replica", broker.bootstrap, registry_dir=registry,
                                  replicas=ReplicaSettings(role="replica")))
    assert replica.service.ingester is None and replica.service.scheduler is None
    answers = replica.client()

    def served_by_replica(version: str) -> Callable[[], bool]:
        def check() -> bool:
            answer = answers.post("/v1/classify", json={"text": "my card", "labels": LABELS})
            return answer.status_code == 200 and answer.json()["adapter_version"] == version
        return check

    with primary.client() as admin:
        for version in versions:
            assert admin.post(f"/v1/adapters/{version}/promote", headers=primary.admin).status_code == 200
            wait_for(served_by_replica(version), 20, f"the replica to serve {version}")
        assert admin.post("/v1/rollback", headers=primary.admin).json()["name"] == versions[0]
        wait_for(served_by_replica(versions[0]), 20, "the replica to roll back")

    # Accuracy the primary records after the replica started shows in the replica's report.
    primary.service.matrix.record(versions[1], {0: WindowScore(accuracy=0.75, loss=1.0, n=8)})
    rows = {row["name"]: row for row in answers.get("/v1/forgetting").json()["versions"]}
    assert rows[versions[1]]["accuracy"] == {"0": 0.75}

    # The replica serves; it never changes the shared registry or trains.
    for path in (f"/v1/adapters/{versions[1]}/promote", "/v1/rollback", "/v1/updates"):
        refused = answers.post(path, headers=replica.admin)
        assert refused.status_code == 409 and "replica" in refused.json()["detail"]
    assert primary.service.registry.live == versions[0]
    assert answers.get("/v1/models").json()["data"][0]["id"] == "live"


def test_replica_refuses_to_start_without_a_live_version(tiny_llama: Path, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="start the primary first"):
        Service(tiny_settings(tmp_path, None, replicas=ReplicaSettings(role="replica")))
