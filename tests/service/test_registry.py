from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from service.registry import ADAPTER_WEIGHTS, METADATA, AdapterRegistry, RegistryError, VersionMetadata

UNGATED = VersionMetadata(parent=None, verdict="accepted", windows_trained=[1], labels=["a"])


def publish(registry: AdapterRegistry) -> str:
    with registry.draft() as draft:
        (draft.path / ADAPTER_WEIGHTS).write_bytes(b"weights")
        return registry.publish(draft, UNGATED).name


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
