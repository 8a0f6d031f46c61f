"""A version's probe scores, kept in its directory so the gate need not score them again.

Each update's gate scores the candidate and the live version on the same probes, and most of
them (an earlier window's budgeted share, every probe's labels but the newest) are probes the
live version was already scored on when it was itself the candidate. Its scores cannot have
changed since: a probe's text is fixed by its id, a version's weights once published, and each
label is scored independently of the others (`LabelScorer.score_among`). So the candidate's
scores are written next to its weights, and read back when it is the live version. So are its
replies on reply probes (`learners.replies.score_replies`): each probe's answer loss and, where
it was answered greedily, the answer's ROUGE-L, valid under the settings they were scored with.

The file is JSON (never pickle: a registry directory is data, not code) and bound to the
weights it was scored with by their digest: a file that is missing, corrupt, or belongs to other
weights only means that everything is scored afresh. It holds the probes scored in one update.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from pathlib import Path

from peft.utils import SAFETENSORS_WEIGHTS_NAME
from pydantic import BaseModel, FiniteFloat, ValidationError

LOG = logging.getLogger(__name__)
PROBE_SCORES_FILE = "probe_scores.json"


class ReplyCell(BaseModel):
    """One reply probe's figures: the reference reply's answer loss (nats/token) and, when the
    probe was answered greedily, the answer's ROUGE-L F1 against it."""

    loss: FiniteFloat
    rouge_l: FiniteFloat | None = None


class ProbeScores(BaseModel):
    """The file's content: the weights' digest, each probe's label scores, and reply figures with
    the settings they hold under (`learners.replies.reply_conditions`)."""

    weights_sha256: str
    scores: dict[str, dict[str, FiniteFloat]]  # probe id → label → log-likelihood
    replies_under: str = ""
    replies: dict[str, ReplyCell] = {}  # probe id → its figures

    def replies_if(self, conditions: str) -> dict[str, ReplyCell]:
        """The reply figures, if they were scored under `conditions`; otherwise none."""
        return self.replies if self.replies_under == conditions else {}


def weights_digest(version_dir: Path) -> str:
    with (version_dir / SAFETENSORS_WEIGHTS_NAME).open("rb") as weights:
        return hashlib.file_digest(weights, "sha256").hexdigest()


def write_probe_scores(version_dir: Path, scores: Mapping[str, Mapping[str, float]],
                       replies: Mapping[str, ReplyCell] | None = None, replies_under: str = "") -> None:
    """Write the scores of the adapter saved in `version_dir`, next to its weights."""
    content = ProbeScores(weights_sha256=weights_digest(version_dir),
                          scores={probe: dict(labels) for probe, labels in scores.items()},
                          replies_under=replies_under, replies=dict(replies or {}))
    (version_dir / PROBE_SCORES_FILE).write_text(content.model_dump_json(), encoding="utf-8")


def read_probe_scores(version_dir: Path) -> ProbeScores:
    """What `write_probe_scores` left in `version_dir`; nothing if it left nothing that can be
    trusted (an older version, a damaged file, or one written for other weights)."""
    path = version_dir / PROBE_SCORES_FILE
    nothing = ProbeScores(weights_sha256="", scores={})
    if not path.is_file():
        return nothing
    try:
        content = ProbeScores.model_validate_json(path.read_bytes())
        if content.weights_sha256 == weights_digest(version_dir):
            return content
        reason = "it was written for other weights"
    except (OSError, ValidationError) as exc:
        reason = f"{type(exc).__name__}: {exc}"
    LOG.warning("ignoring %s: %s; every probe is scored afresh", path, reason)
    return nothing
