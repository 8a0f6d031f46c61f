"""A version's probe scores are read back only as they were written, for the weights beside them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from peft.utils import SAFETENSORS_WEIGHTS_NAME

from learners.score_cache import PROBE_SCORES_FILE, ReplyCell, read_probe_scores, weights_digest, write_probe_scores

SCORES = {"p1": {"card_arrival": -0.25, "exchange_rate": -3.5}, "p2": {"pin_blocked": -1.0}}


def version(tmp_path: Path) -> Path:
    directory = tmp_path / "v0001"
    directory.mkdir()
    (directory / SAFETENSORS_WEIGHTS_NAME).write_bytes(b"the adapter's weights")
    return directory


def test_scores_written_are_read_back(tmp_path: Path) -> None:
    directory = version(tmp_path)
    assert read_probe_scores(directory).scores == {}  # an older version, without the file
    write_probe_scores(directory, SCORES)
    assert read_probe_scores(directory).scores == SCORES
    assert json.loads((directory / PROBE_SCORES_FILE).read_text())["scores"] == SCORES


def test_reply_figures_are_read_back_only_under_the_conditions_they_were_scored_in(tmp_path: Path) -> None:
    directory = version(tmp_path)
    replies = {"p1": ReplyCell(loss=0.5, rouge_l=0.75), "p2": ReplyCell(loss=1.25)}
    write_probe_scores(directory, SCORES, replies, replies_under='["Be brief.", 256, 96]')
    cached = read_probe_scores(directory)
    assert cached.scores == SCORES and cached.replies_if('["Be brief.", 256, 96]') == replies
    assert cached.replies_if('[null, 256, 96]') == {}  # another system prompt answers otherwise
    write_probe_scores(directory, SCORES)  # a version scored on no reply probes
    assert read_probe_scores(directory).replies_if("") == {}


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
    assert read_probe_scores(directory).scores == {}
    assert "every probe is scored afresh" in caplog.text


def test_scores_of_replaced_weights_are_not_read(tmp_path: Path) -> None:
    directory = version(tmp_path)
    write_probe_scores(directory, SCORES)
    (directory / SAFETENSORS_WEIGHTS_NAME).write_bytes(b"other weights")
    assert read_probe_scores(directory).scores == {}
    (directory / SAFETENSORS_WEIGHTS_NAME).unlink()
    assert read_probe_scores(directory).scores == {}
