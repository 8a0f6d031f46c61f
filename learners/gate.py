"""The forgetting gate: the candidate against the live version on every window's probe set."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from learners.config import GateSettings
from learners.scoring import LabelScorer
from streams.records import TicketRecord


@dataclass(frozen=True)
class WindowScore:
    """Accuracy by label scoring and mean negative log-likelihood of the true label."""

    accuracy: float
    loss: float
    n: int


def evaluate(model: nn.Module, scorer: LabelScorer,
             probes: Mapping[int, Sequence[TicketRecord]]) -> dict[int, WindowScore]:
    """Score every labelled probe of every window (windows without labelled probes are left out)."""
    index = {label: i for i, label in enumerate(scorer.labels)}
    result: dict[int, WindowScore] = {}
    for window, records in probes.items():
        labelled = [r for r in records if r.label in index]
        if not labelled:
            continue
        scores = scorer.score_many(model, [r.text for r in labelled])
        truth = torch.tensor([index[r.label] for r in labelled if r.label is not None])
        log_probs = torch.log_softmax(scores, dim=1)
        result[window] = WindowScore(
            accuracy=float((scores.argmax(dim=1) == truth).float().mean()),
            loss=float(-log_probs.gather(1, truth[:, None]).mean()),
            n=len(labelled),
        )
    return result


@dataclass(frozen=True)
class GateReport:
    passed: bool
    reason: str
    new_windows: tuple[int, ...]
    candidate: dict[int, WindowScore]
    live: dict[int, WindowScore]
    thresholds: GateSettings

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "reason": self.reason,
            "new_windows": list(self.new_windows),
            "candidate": {str(w): asdict(s) for w, s in self.candidate.items()},
            "live": {str(w): asdict(s) for w, s in self.live.items()},
            "thresholds": self.thresholds.model_dump(),
        }


def judge(candidate: dict[int, WindowScore], live: dict[int, WindowScore],
          new_windows: Sequence[int], policy: GateSettings) -> GateReport:
    """Pass only if no earlier window drops past `max_drop` and the new ones gain `min_gain`."""
    def report(passed: bool, reason: str) -> GateReport:
        return GateReport(passed, reason, tuple(new_windows), candidate, live, policy)

    for window in sorted(candidate):
        if window in new_windows or window not in live:
            continue
        drop = live[window].accuracy - candidate[window].accuracy
        if drop > policy.max_drop:
            return report(False, f"window {window} accuracy fell {drop:.3f} "
                                 f"({live[window].accuracy:.3f} → {candidate[window].accuracy:.3f}), "
                                 f"more than max_drop {policy.max_drop}")
    scored_new = [w for w in new_windows if w in candidate and w in live]
    if scored_new:
        gain = (sum(candidate[w].accuracy - live[w].accuracy for w in scored_new)) / len(scored_new)
        if gain < policy.min_gain:
            return report(False, f"new window(s) gained {gain:.3f} accuracy, less than min_gain "
                                 f"{policy.min_gain}")
        return report(True, f"new window(s) gained {gain:.3f} accuracy and no earlier window fell "
                            f"more than {policy.max_drop}")
    return report(True, f"no earlier window fell more than {policy.max_drop}; new windows have no "
                        "labelled probes")
