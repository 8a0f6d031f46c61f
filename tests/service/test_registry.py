from __future__ import annotations

from pathlib import Path

import pytest

from service.registry import ADAPTER_WEIGHTS, AdapterRegistry, RegistryError, VersionMetadata

METADATA = VersionMetadata(parent=None, verdict="accepted", windows_trained=[1], labels=["a"])


def publish(registry: AdapterRegistry) -> str:
    with registry.draft() as draft:
        (draft.path / ADAPTER_WEIGHTS).write_bytes(b"weights")
        return registry.publish(draft, METADATA).name


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
        registry.publish(draft, METADATA)  # a draft without weights is never published
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
