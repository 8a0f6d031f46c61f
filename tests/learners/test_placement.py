"""Device and precision settings: refused at start-up where the machine cannot honour them,
bfloat16 carried through training, merging and serving (on the CPU here; tests/gpu on CUDA), and
a non-finite gradient never reaching the weights."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from pydantic import ValidationError
from safetensors.torch import load_file
from typer.testing import CliRunner

from learners.base_model import load_base
from learners.config import AdapterSettings
from learners.ewc import EwcPenalty, trainable
from learners.methods import peft_config
from learners.placement import Placement, PlacementError, base_dtype, place
from learners.prompts import ticket_examples
from learners.scoring import LabelScorer
from learners.train import Diverged, run_round
from learners.update_step import initial_adapter, train_adapter
from learners.worker import Job
from service.cli import app
from service.registry import ADAPTER_WEIGHTS, AdapterRegistry, VersionMetadata
from service.runtime import ModelRuntime
from service.settings import ModelSettings
from streams.records import TicketRecord
from tests.conftest import TINY_TRAIN

BF16 = Placement(device="cpu", precision="bfloat16")
LABELS = ["card_arrival", "exchange_rate"]
RECORDS = [TicketRecord(id=f"t{i}", text=f"my {'card' if i % 2 else 'rate'} issue {i}", label=LABELS[i % 2])
           for i in range(40)]
TEXTS = ["my card issue 3", "my rate issue 4"]

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


@no_cuda
@pytest.mark.parametrize(("env", "named"), [
    ({"EVERGREEN_MODEL_DEVICE": "cuda"}, "`model.device` is cuda but this machine has no CUDA device"),
    ({"EVERGREEN_TRAIN_DEVICE": "cuda:1"}, "`train.device` is cuda:1 but this machine has no CUDA device"),
    ({"EVERGREEN_MODEL_PRECISION": "float16"}, "`model.precision` float16 needs a CUDA device"),
])
def test_a_device_or_precision_the_machine_lacks_stops_the_start_naming_the_setting(
        env: dict[str, str], named: str, tmp_path: Path) -> None:
    for command in (["serve"], ["up"]):
        result = CliRunner().invoke(app, command, env={**env, "EVERGREEN_DATA_DIR": str(tmp_path)})
        assert result.exit_code == 2, result.output
        assert named in " ".join(result.output.split()), result.output
        assert not (tmp_path / "registry").exists()  # refused before anything was loaded or written


def test_device_and_precision_words_are_checked_with_the_settings() -> None:
    with pytest.raises(ValidationError, match="device"):
        ModelSettings(device="gpu")
    with pytest.raises(ValidationError, match="precision"):
        ModelSettings(precision="int8")  # type: ignore[arg-type]
    with pytest.raises(PlacementError, match="`model.device` must be auto, cpu, cuda or cuda:N"):
        place("cuda:x", "float32")
    auto = place("auto", "float32")
    assert auto.device == ("cuda:0" if torch.cuda.is_available() else "cpu")


def test_a_training_job_carries_its_placement() -> None:
    job = Job.model_json_schema()
    assert "placement" in job["properties"]
    assert Placement.model_validate_json(BF16.model_dump_json()) == BF16


def test_bfloat16_trains_an_fp32_adapter_and_serves_it_merged_into_bf16_weights(tiny_llama: Path,
                                                                                 tmp_path: Path) -> None:
    registry = AdapterRegistry(tmp_path / "registry")
    with registry.draft() as draft:
        initial_adapter(tiny_llama, draft.path, AdapterSettings(), 0, BF16)
        registry.promote(registry.publish(draft, VersionMetadata(parent=None, verdict="accepted", windows_trained=[],
                                                                 labels=LABELS)).name)
    with registry.draft() as draft:
        model, tokenizer, report = train_adapter(RECORDS, [], tiny_llama, registry.path("v0000"), draft.path,
                                                 TINY_TRAIN.model_copy(update={"epochs": 10}), placement=BF16)
        trained = registry.publish(draft, VersionMetadata(parent="v0000", verdict="accepted", windows_trained=[1],
                                                          labels=LABELS)).name
    assert (report.device, report.precision) == ("cpu", "bfloat16") and report.final_loss < 0.1
    assert base_dtype(model) == "bfloat16"
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}  # PEFT keeps the adapter fp32
    assert {t.dtype for t in load_file(str(registry.path(trained) / ADAPTER_WEIGHTS)).values()} == {torch.float32}

    runtime = ModelRuntime(tiny_llama, registry, trained, placement=BF16)
    scorer = LabelScorer(tokenizer, LABELS)
    with runtime.pinned() as run:
        assert run.merged and {p.dtype for p in run.model.parameters()} == {torch.bfloat16}
        served = scorer.score_batch(run.model, TEXTS)
    fp32, _ = load_base(tiny_llama)
    exact = scorer.score_batch(PeftModel.from_pretrained(fp32, registry.path(trained)).eval(), TEXTS)
    # bf16 keeps 8 bits of mantissa: log-probabilities agree to a few hundredths, answers exactly.
    assert torch.allclose(served, exact, atol=0.1), (served - exact).abs().max()
    assert served.argmax(dim=1).tolist() == exact.argmax(dim=1).tolist() == [1, 0]


def test_steps_with_a_non_finite_gradient_are_skipped_and_a_round_of_only_those_fails(tiny_llama: Path) -> None:
    base, tokenizer = load_base(tiny_llama)
    torch.manual_seed(0)
    model = get_peft_model(base, peft_config(AdapterSettings()))
    before = {n: p.detach().clone() for n, p in trainable(model).items()}
    # A Fisher with a NaN makes the penalty, and so every gradient, NaN (as an fp16 overflow or a
    # NaN from a kernel would make one batch's).
    poisoned = EwcPenalty.anchored_at(model, {n: torch.full_like(p, math.nan) for n, p in trainable(model).items()},
                                      1.0)
    examples = ticket_examples(tokenizer, RECORDS[:16], 64, None)
    cfg = TINY_TRAIN.model_copy(update={"epochs": 1})
    with pytest.raises(Diverged, match="every one of the 2 steps had a non-finite gradient"):
        run_round(model, examples, [], cfg, tokenizer.pad_token_id, poisoned)
    assert all(torch.equal(p, before[n]) for n, p in trainable(model).items())  # no step touched the adapter
    report = run_round(model, examples, [], cfg, tokenizer.pad_token_id)
    assert report.skipped_steps == 0 and math.isfinite(report.final_loss)
