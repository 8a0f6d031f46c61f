"""Versions are served merged into a copy of the base weights: same scores as PEFT's unmerged
model, the base left untouched, and weights that are not finite refused."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from learners.base_model import load_base
from learners.config import AdapterSettings
from learners.scoring import LabelScorer
from learners.update_step import initial_adapter
from service.live import LiveVersion
from service.registry import ADAPTER_WEIGHTS, AdapterRegistry, VersionMetadata
from service.runtime import ModelRuntime, UnsafeAdapter
from service.settings import ServingSettings, Settings
from tests.conftest import LiveService, add_versions, tiny_settings

LABELS = ["card arrival", "exchange rate", "top up failed", "lost or stolen card"]
TEXTS = ["my card has not arrived", "what rate do you use for euros?", "top up did not work"]


@pytest.fixture
def registry(tiny_llama: Path, tmp_path: Path) -> AdapterRegistry:
    registry = AdapterRegistry(tmp_path / "registry")
    with registry.draft() as draft:
        initial_adapter(tiny_llama, draft.path, AdapterSettings(), seed=0)
        info = registry.publish(draft, VersionMetadata(parent=None, verdict="accepted", windows_trained=[],
                                                       labels=LABELS))
    registry.promote(info.name)
    return registry


def unmerged_scores(base_path: Path, registry: AdapterRegistry, version: str) -> torch.Tensor:
    base, tokenizer = load_base(base_path)
    model = PeftModel.from_pretrained(base, registry.path(version)).eval()
    return LabelScorer(tokenizer, LABELS).score_batch(model, TEXTS)


def test_merged_version_scores_like_the_unmerged_peft_model(tiny_llama: Path, registry: AdapterRegistry) -> None:
    versions = add_versions(registry, 2, LABELS)
    runtime = ModelRuntime(tiny_llama, registry, versions[0])
    pristine = {k: v.clone() for k, v in runtime.base.state_dict().items()}
    runtime.swap(versions[1])
    scorer = LabelScorer(runtime.tokenizer, LABELS)
    for version in versions:
        with runtime.pinned(version) as run:
            assert run.merged and not isinstance(run.model, PeftModel)
            served = scorer.score_batch(run.model, TEXTS)
        expected = unmerged_scores(tiny_llama, registry, version)
        assert torch.allclose(served, expected, atol=1e-4), (served - expected).abs().max()
    # The two versions differ from each other, and building them left the shared base untouched.
    assert not torch.allclose(scorer.score_batch(runtime.model, TEXTS),
                              unmerged_scores(tiny_llama, registry, versions[0]), atol=1e-3)
    assert all(torch.equal(v, pristine[k]) for k, v in runtime.base.state_dict().items())


def test_a_version_peft_must_merge_scores_like_the_unmerged_model(tiny_llama: Path,
                                                                   registry: AdapterRegistry) -> None:
    """A rank pattern is outside the direct merge: PEFT merges it instead."""
    [version] = add_versions(registry, 1, LABELS)
    config_path = registry.path(version) / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["rank_pattern"] = {"q_proj": config["r"]}  # same numbers, a different code path
    config_path.write_text(json.dumps(config))
    runtime = ModelRuntime(tiny_llama, registry, version)
    served = LabelScorer(runtime.tokenizer, LABELS).score_batch(runtime.model, TEXTS)
    assert not isinstance(runtime.model, PeftModel)
    assert torch.allclose(served, unmerged_scores(tiny_llama, registry, version), atol=1e-4)


def version_with(registry: AdapterRegistry, change: Callable[[str, torch.Tensor], torch.Tensor]) -> str:
    """A registry version whose weights are v0000's passed through `change(name, tensor)`."""
    source = registry.path("v0000")
    with registry.draft() as draft:
        shutil.copy(source / "adapter_config.json", draft.path / "adapter_config.json")
        weights = {k: change(k, v) for k, v in load_file(str(source / ADAPTER_WEIGHTS)).items()}
        save_file(weights, str(draft.path / ADAPTER_WEIGHTS))
        metadata = VersionMetadata(parent="v0000", verdict="accepted", windows_trained=[], labels=LABELS)
        return registry.publish(draft, metadata).name


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_versions_are_refused_and_the_live_one_kept(tiny_llama: Path, registry: AdapterRegistry,
                                                               bad: float) -> None:
    def poison(name: str, tensor: torch.Tensor) -> torch.Tensor:
        return torch.where(torch.arange(tensor.numel()).view(tensor.shape) == 0, bad, tensor)

    poisoned = version_with(registry, poison)
    runtime = ModelRuntime(tiny_llama, registry, "v0000")
    with pytest.raises(UnsafeAdapter, match="non-finite"):
        LiveVersion(registry, runtime).promote(poisoned)
    assert runtime.version == "v0000" and runtime.attached() == ["v0000"]
    assert registry.live == "v0000"  # the pointer never named the refused weights


def test_finite_weights_whose_merge_overflows_are_refused(tiny_llama: Path, registry: AdapterRegistry) -> None:
    overflowing = version_with(registry, lambda name, tensor: torch.full_like(tensor, 1e30))
    runtime = ModelRuntime(tiny_llama, registry, "v0000")
    with pytest.raises(UnsafeAdapter, match="non-finite"):
        runtime.prepare(overflowing)
    assert runtime.attached() == ["v0000"]


def test_a_loaded_version_is_promoted_by_moving_the_pointer(serve: Callable[[Settings], LiveService],
                                                           tmp_path: Path) -> None:
    live = serve(tiny_settings(tmp_path, None, serving=ServingSettings(cached_versions=1)))
    [version] = add_versions(live.service.registry, 1, LABELS)
    runtime = live.service.runtime
    with live.client() as client:
        assert client.post(f"/v1/adapters/{version}/load", headers=live.admin).status_code == 200
        assert runtime.version == "v0000" and version in runtime.attached()
        with runtime.pinned(version) as loaded:
            pass
        assert client.post(f"/v1/adapters/{version}/promote", headers=live.admin).status_code == 200
        assert runtime.model is loaded.model  # nothing was rebuilt at promotion
        assert client.post("/v1/classify", json={"text": "my card", "labels": LABELS}).json()[
            "adapter_version"] == version
        assert client.post("/v1/adapters/v9999/load", headers=live.admin).status_code == 404
