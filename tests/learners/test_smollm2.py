"""The real default base model: SmolLM2-135M-Instruct, converted from the shipped GGUF."""

from __future__ import annotations

from pathlib import Path

import pytest

from learners.base_model import SMOLLM2, load_base, resolve_base_model
from learners.config import AdapterSettings
from learners.update_step import initial_adapter
from service.registry import AdapterRegistry, VersionMetadata
from service.runtime import ModelRuntime
from tests.conftest import MODEL_CACHE, classify_served


@pytest.fixture(scope="module")
def smollm2() -> Path:
    return resolve_base_model(SMOLLM2, MODEL_CACHE)


def test_smollm2_classifies_zero_shot_through_the_serving_runtime(smollm2: Path, tmp_path: Path) -> None:
    model, _ = load_base(smollm2)
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    del model
    registry = AdapterRegistry(tmp_path)
    with registry.draft() as draft:
        initial_adapter(smollm2, draft.path, AdapterSettings(rank=8), seed=0)
        info = registry.publish(draft, VersionMetadata(parent=None, verdict="accepted", windows_trained=[], labels=[]))
    registry.promote(info.name)
    runtime = ModelRuntime(smollm2, registry, "v0000")
    labels = ["lost_or_stolen_card", "exchange_rate", "top_up_failed"]
    cases = {"Someone stole my wallet with my card in it, please block it": "lost_or_stolen_card",
             "What exchange rate do you use when I pay in dollars?": "exchange_rate"}
    for answer, expected in zip(classify_served(runtime, list(cases), labels, 3), cases.values(), strict=True):
        assert answer.adapter_version == "v0000"
        assert answer.label == expected, answer
        assert sum(c for _, c in answer.top) == pytest.approx(1.0, abs=1e-4)
