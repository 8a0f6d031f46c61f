"""A version's probe scores are read back only as they were written, for the weights beside them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from peft.utils import SAFETENSORS_WEIGHTS_NAME

from learners.score_cache import PROBE_SCORES_FILE, read_probe_scores, weights_digest, write_probe_scores

SCORES = {"p1": {"card_arrival": -0.25, "exchange_rate": -3.5}, "p2": {"pin_blocked": -1.0}}


def version(tmp_path: Path) -> Path:
    directory = tmp_path / "v0001"
    directory.mkdir()
    (directory / SAFETENSORS_WEIGHTS_NAME).write_bytes(b"the adapter's weights")
    return directory


def test_scores_written_are_read_back(tmp_path: Path) -> None:
    directory = version(tmp_path)
    assert read_probe_scores(directory) == {}  # an older version, without the file
    write_probe_scores(directory, SCORES)
    assert read_probe_scores(directory) == SCORES
    assert json.loads((directory / PROBE_SCORES_FILE).read_text())["scores"] == SCORES


@pytest.mark.parametrize("content", [
    '{"weights_sha256": "',  # cut short
    json.dumps(SCORES),  # the scores alone: whose weights?
    '{"weights_sha256": "DIGEST", "scores": {"p1": {"card_arrival": NaN}}}',
    '{"weights_sha256": "DIGEST", "scores": {"p1": -0.25}}',
    '{"weights_sha256": "0000", "scores": {"p1": {"card_arrival": -0.25}}}',  # other weights
])
def test_a_damaged_or_foreign_file_means_scoring_everything(tmp_path: Path, content: str,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    directory = version(tmp_path)
    (directory / PROBE_SCORES_FILE).write_text(content.replace("DIGEST", weights_digest(directory)))
    assert read_probe_scores(directory) == {}
    assert "every probe is scored afresh" in caplog.text


def test_scores_of_replaced_weights_are_not_read(tmp_path: Path) -> None:
    directory = version(tmp_path)
    write_probe_scores(directory, SCORES)
    (directory / SAFETENSORS_WEIGHTS_NAME).write_bytes(b"other weights")
    assert read_probe_scores(directory) == {}
    (directory / SAFETENSORS_WEIGHTS_NAME).unlink()
    assert read_probe_scores(directory) == {}
