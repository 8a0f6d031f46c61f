from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from service.registry import ADAPTER_WEIGHTS, METADATA, AdapterRegistry, RegistryError, Verdict, VersionMetadata

UNGATED = VersionMetadata(parent=None, verdict="accepted", windows_trained=[1], labels=["a"])


def publish(registry: AdapterRegistry, verdict: Verdict = "accepted") -> str:
    with registry.draft() as draft:
        (draft.path / ADAPTER_WEIGHTS).write_bytes(b"weights")
        return registry.publish(draft, UNGATED.model_copy(update={"verdict": verdict})).name


def test_versions_are_immutable_names_and_rollback_moves_the_pointer(tmp_path: Path) -> None:
    registry = AdapterRegistry(tmp_path)
    names = [publish(registry) for _ in range(3)]
    assert names == ["v0000", "v0001", "v0002"]
    for name in names:
        registry.promote(name)
    assert registry.live == "v0002"
    assert registry.rollback() == "v0001" and registry.live == "v0001"
    assert AdapterRegistry(tmp_path).live == "v0001"  # the pointer is on disk


def test_a_crashed_writer_leaves_no_version_and_no_reused_name(tmp_path: Path) -> None:
    registry = AdapterRegistry(tmp_path)
    publish(registry)
    with pytest.raises(RuntimeError), registry.draft() as draft:
        (draft.path / ADAPTER_WEIGHTS).write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert not draft.path.exists() and registry.names() == ["v0000"]
    with pytest.raises(RegistryError, match="safetensors"), registry.draft() as draft:
        registry.publish(draft, UNGATED)  # a draft without weights is never published
    assert not draft.path.exists() and registry.names() == ["v0000"]
    (tmp_path / "versions" / "v0001.tmp").mkdir()  # as a kill -9 would leave it
    assert AdapterRegistry(tmp_path).names() == ["v0000"]
    assert not (tmp_path / "versions" / "v0001.tmp").exists()


def test_only_registry_names_with_safetensors_load(tmp_path: Path) -> None:
    registry = AdapterRegistry(tmp_path)
    for bad in ("../etc", "v0000", "/tmp"):
        with pytest.raises(RegistryError):
            registry.path(bad)
    (tmp_path / "versions" / "v0005").mkdir()
    (tmp_path / "versions" / "v0005" / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(RegistryError, match="safetensors"):
        registry.path("v0005")
    with pytest.raises(RegistryError):
        registry.rollback()


# Metadata as earlier versions of the service wrote it: the walking skeleton's gate report (no
# checks, no base, no canary), then one with checks, a canary and the round's figures.
SKELETON = {"name": "v0001", "parent": "v0000", "created_at": 1.0, "verdict": "accepted", "windows_trained": [1],
            "labels": ["a"], "overrides": [], "train": None,
            "gate": {"passed": True, "reason": "ok", "new_windows": [1], "live": {},
                     "candidate": {"1": {"accuracy": 0.9, "loss": 0.3, "n": 10}},
                     "thresholds": {"max_drop": 0.05, "min_gain": 0.0}}}
CANARY = {**SKELETON, "name": "v0002", "verdict": "rejected", "overrides": [{"action": "promote", "at": 2.0}],
          "train": {"steps": 4, "examples_new": 8, "examples_replay": 0, "final_loss": 0.5, "tokens": 100,
                    "seconds": 1.5},
          "gate": {**SKELETON["gate"], "passed": False, "test": "exact one-sided McNemar test",
                   "candidate": {"1": {"accuracy": 0.5, "loss": 0.7, "n": 10, "majority_rate": 0.5,
                                       "known_accuracy": None}},
                   "base": {"1": {"accuracy": 0.1, "loss": 2.0, "n": 10, "majority_rate": 0.5, "known_accuracy": None}},
                   "checks": [{"name": "canary loss increase over the base model", "passed": False, "observed": 0.5,
                               "threshold": 0.2, "p_value": None, "detail": ""}],
                   "canary": {"candidate": 3.5, "live": 3.0, "base": 3.0, "drift": 0.5}}}


@pytest.mark.parametrize("written", [SKELETON, CANARY], ids=["skeleton", "canary"])
def test_metadata_written_by_earlier_versions_still_loads(tmp_path: Path, written: dict[str, Any]) -> None:
    registry = AdapterRegistry(tmp_path)
    directory = tmp_path / "versions" / written["name"]
    directory.mkdir()
    (directory / ADAPTER_WEIGHTS).write_bytes(b"weights")
    (directory / METADATA).write_text(json.dumps(written))
    info = registry.info(written["name"])
    assert info.gate is not None and info.gate.candidate[1].accuracy == written["gate"]["candidate"]["1"]["accuracy"]
    registry.record(info)  # rewritten in today's shape, which holds what was there
    rewritten = json.loads((directory / METADATA).read_text())
    assert rewritten["gate"]["candidate"]["1"].items() >= written["gate"]["candidate"]["1"].items()
    assert rewritten["gate"]["checks"] == written["gate"].get("checks", [])
    assert rewritten["overrides"] == written["overrides"]
    assert (rewritten["train"] or {}).items() >= (written["train"] or {}).items()


def on_disk(registry: AdapterRegistry) -> list[str]:
    """Versions whose weights are still there."""
    return [n for n in registry.names() if (registry.versions_dir / n / ADAPTER_WEIGHTS).exists()]


def test_retention_keeps_the_newest_and_never_the_live_version_or_its_rollback_target(tmp_path: Path) -> None:
    registry = AdapterRegistry(tmp_path)
    promoted = ["v0000", "v0001", "v0003", "v0006", "v0007"]
    verdicts: list[Verdict] = ["accepted", "accepted", "rejected", "accepted", "rejected", "rejected", "accepted",
                               "accepted", "rejected", "accepted"]
    for verdict in verdicts:
        name = publish(registry, verdict)
        if name in promoted:
            registry.promote(name)
    # Live v0007, rollback target v0006. Rejected and never promoted: v0002, v0004, v0005, v0008;
    # superseded: v0001 and v0003 (once live), v0009 (accepted, never served).
    assert registry.prune(keep_rejected=1, keep_superseded=1) == ["v0001", "v0002", "v0003", "v0004", "v0005"]
    assert on_disk(registry) == ["v0000", "v0006", "v0007", "v0008", "v0009"]
    assert registry.prune(keep_rejected=1, keep_superseded=1) == []  # already within bounds
    # A pruned version keeps its record but can no longer be loaded or promoted.
    assert len(registry.names()) == 10 and registry.info("v0001").pruned_at is not None
    assert registry.info("v0002").verdict == "rejected"
    with pytest.raises(RegistryError, match="pruned"):
        registry.promote("v0003")
    assert sorted(p.name for p in (tmp_path / "versions" / "v0003").iterdir()) == [METADATA]

    # Old versions outlive newer ones while they are live or the rollback target.
    registry.promote("v0009")
    with registry.draft() as draft:  # a candidate being written is not a version: never pruned
        newer = [publish(registry) for _ in range(2)]
        assert registry.prune(keep_rejected=0, keep_superseded=0) == ["v0006", "v0008", *newer]
        assert draft.path.is_dir()
    assert on_disk(registry) == ["v0000", "v0007", "v0009"]
    assert publish(registry) == "v0013"  # names of pruned versions are never reused

    # Rollback only walks back through versions that are still there.
    assert registry.rollback() == "v0007" and registry.rollback() == "v0000"
    with pytest.raises(RegistryError, match="no earlier live version"):
        registry.rollback()


def test_a_prune_killed_midway_is_finished_at_the_next_start(tmp_path: Path) -> None:
    registry = AdapterRegistry(tmp_path)
    for name in [publish(registry) for _ in range(3)]:
        registry.promote(name)
    # What a kill after marking v0000 pruned, before its files were deleted, leaves behind.
    registry.record(registry.info("v0000").model_copy(update={"pruned_at": 1.0}))
    with pytest.raises(RegistryError, match="pruned"):
        registry.path("v0000")  # its leftover weights never load
    assert on_disk(AdapterRegistry(tmp_path, writer=False)) == ["v0000", "v0001", "v0002"]  # a reader deletes nothing
    reopened = AdapterRegistry(tmp_path)
    assert on_disk(reopened) == ["v0001", "v0002"] and reopened.names() == ["v0000", "v0001", "v0002"]
    assert reopened.info("v0000").pruned_at == 1.0 and reopened.live == "v0002"
