"""`model.base` as any Hugging Face causal-LM directory: another architecture than the bundled
llama (Qwen2: biased attention projections, an untied output head) trains, scores, is served
merged and answers chat; GGUF export, llama-only, says so."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from learners.config import AdapterSettings
from learners.prompts import chat_ids
from learners.scoring import LabelScorer
from learners.update_step import initial_adapter, train_adapter
from service.export import Exporter, ExportError
from service.generation import Generator, Sampling
from service.registry import AdapterRegistry, VersionMetadata
from service.runtime import ModelRuntime
from streams.records import TicketRecord
from tests.conftest import TINY_TRAIN

LABELS = ["card_arrival", "exchange_rate"]
RECORDS = [TicketRecord(id=f"t{i}", text=f"my {'card' if i % 2 else 'rate'} issue {i}", label=LABELS[i % 2])
           for i in range(40)]


@pytest.fixture(scope="module")
def qwen2(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Qwen2 directory, as `save_pretrained` writes one (the SmolLM2 tokenizer)."""
    out = tmp_path_factory.mktemp("qwen2")
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, initializer_range=0.3,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_a_qwen2_directory_trains_scores_serves_merged_and_answers(qwen2: Path, tmp_path: Path) -> None:
    registry = AdapterRegistry(tmp_path / "registry")
    with registry.draft() as draft:
        initial_adapter(qwen2, draft.path, AdapterSettings(), 0)
        registry.promote(registry.publish(draft, VersionMetadata(parent=None, verdict="accepted", windows_trained=[],
                                                                 labels=LABELS)).name)
    with registry.draft() as draft:
        _, tokenizer, report = train_adapter(RECORDS, [], qwen2, registry.path("v0000"), draft.path,
                                             TINY_TRAIN.model_copy(update={"epochs": 10}))
        trained = registry.publish(draft, VersionMetadata(parent="v0000", verdict="accepted", windows_trained=[1],
                                                          labels=LABELS)).name
    assert report.final_loss < 0.1, report

    runtime = ModelRuntime(qwen2, registry, trained)
    with runtime.pinned() as run:
        assert run.merged  # LoRA on biased projections merges into their weights alone
        scores = LabelScorer(tokenizer, LABELS).score_batch(run.model, ["my card issue 3", "my rate issue 4"])
    assert scores.argmax(dim=1).tolist() == [1, 0]
    answer = Generator(runtime, 256).start(chat_ids(tokenizer, [{"role": "user", "content": "my card"}]),
                                           Sampling(max_tokens=4, temperature=0))
    assert answer.version == trained and answer.text()

    with pytest.raises(ExportError, match="only llama-architecture base models are exported as GGUF; this one is "
                                          "'qwen2'"):
        Exporter(registry, lambda: runtime.base, qwen2, None).export(trained, "f16")
