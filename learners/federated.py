"""Federated evaluation: each site's per-probe results, pooled into one gate verdict at the hub.

A federated round's candidate (the hub's average of the sites' adapters) is gated by every site
on its own probes against its live version, exactly as its own update's candidate would be
(`learners.update_step.evaluate_candidate`). What leaves a site is `SiteScores`: per probe, its
label, the answers of both versions and the model's log-probability of each label; never a
ticket's text. The hub pools the sites window by window, probe rows side by side, and applies the
usual checks to the pool (`judge_pooled`): a site holds a few probes of a window, too few to judge
alone, and a regression at one site counts at the weight of its probes.

Windows are matched by number: sites that take part in every round close one window a round, so
window k is round k's everywhere. These results are not covered by `train.privacy`: they describe
held-out probes, which no round trains on, but they are the site's tickets' labels.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from learners.config import GateSettings
from learners.gate import judge
from learners.reports import Canary, GateReport, ReplyScore, WindowScore

SITE_SCORES_FILE = "site_scores.json"  # what the worker's evaluation writes for the hub


def _whole(score: WindowScore | ReplyScore) -> dict[str, Any]:
    """Every field, the per-probe ones too (the report's JSON leaves them out)."""
    return {name: getattr(score, name) for name in type(score).model_fields}


class SiteScores(BaseModel):
    """One site's gate figures on a federated candidate, per probe, for the hub to pool."""

    model_config = ConfigDict(ser_json_inf_nan="constants")  # a label off a probe's shortlist scores -inf
    site: str = Field(default="", description="The site's name, as the hub knows its key.")
    new_windows: list[int]
    candidate: dict[int, dict[str, Any]] = Field(description="`WindowScore` fields, by window.")
    live: dict[int, dict[str, Any]]
    replies_candidate: dict[int, dict[str, Any]] = {}
    replies_live: dict[int, dict[str, Any]] = {}
    canary: Canary | None = None
    verdict: str = Field(default="", description="The site's own gate on its probes alone (for the log).")

    @classmethod
    def of(cls, report: GateReport) -> SiteScores:
        return cls(new_windows=list(report.new_windows),
                   candidate={w: _whole(s) for w, s in report.candidate.items()},
                   live={w: _whole(s) for w, s in report.live.items()},
                   replies_candidate={w: _whole(s) for w, s in report.replies_candidate.items()},
                   replies_live={w: _whole(s) for w, s in report.replies_live.items()},
                   canary=report.canary, verdict=report.reason)

    def windows(self, side: str) -> dict[int, WindowScore]:
        return {w: WindowScore.model_validate(s) for w, s in getattr(self, side).items()}

    def replies(self, side: str) -> dict[int, ReplyScore]:
        return {w: ReplyScore.model_validate(s) for w, s in getattr(self, f"replies_{side}").items()}

    @property
    def probes(self) -> int:
        return sum(len(s.get("correct", ())) for s in self.candidate.values())


def pooled_window(scores: Sequence[WindowScore]) -> WindowScore:
    """Several sites' scores on one window as one: their probes side by side, in the order given
    (so a candidate's and a live version's pools pair probe by probe), each probe's label scores
    widened to every site's labels (-inf where a site did not score a label).

    >>> a = WindowScore(accuracy=1.0, loss=0.1, n=1, correct=(True,), truth=("x",), labels=("x",),
    ...                 model_scores=((0.0,),), known_correct=(True,), known_accuracy=1.0)
    >>> b = WindowScore(accuracy=0.0, loss=0.9, n=2, correct=(False, False), truth=("y", "y"),
    ...                 labels=("y", "z"), model_scores=((-1.0, -0.4), (-1.0, -0.4)))
    >>> both = pooled_window([a, b])
    >>> both.accuracy, both.labels, both.model_scores[0], both.known_accuracy, round(both.loss, 4)
    (0.3333333333333333, ('x', 'y', 'z'), (0.0, -inf, -inf), 1.0, 0.6333)
    """
    labels = tuple(dict.fromkeys(label for s in scores for label in s.labels))
    rows = tuple(tuple(row[s.labels.index(label)] if label in s.labels else -math.inf for label in labels)
                 for s in scores for row in s.model_scores)
    correct = tuple(c for s in scores for c in s.correct)
    known_correct = tuple(c for s in scores for c in s.known_correct)
    truth = tuple(t for s in scores for t in s.truth)
    losses = [(s.loss, s.n) for s in scores if math.isfinite(s.loss)]
    return WindowScore(
        accuracy=sum(correct) / len(correct) if correct else 0.0,
        loss=sum(loss * n for loss, n in losses) / sum(n for _, n in losses) if losses else math.nan,
        n=sum(s.n for s in scores), correct=correct, truth=truth,
        answers=tuple(a for s in scores for a in s.answers),
        model_answers=tuple(a for s in scores for a in s.model_answers or s.answers),
        model_scores=rows, labels=labels,
        majority_rate=max(Counter(truth).values()) / len(truth) if truth else 0.0,
        known_accuracy=sum(known_correct) / len(known_correct) if known_correct else None,
        known_correct=known_correct, shortlisted=sum(s.shortlisted for s in scores))


def pooled_replies(scores: Sequence[ReplyScore]) -> ReplyScore:
    """Several sites' reply scores on one window as one, probes side by side."""
    losses = tuple(x for s in scores for x in s.losses)
    rouges = tuple(x for s in scores for x in s.rouges)
    return ReplyScore(n=sum(s.n for s in scores), loss=sum(losses) / len(losses) if losses else math.nan,
                      answered=sum(s.answered for s in scores), losses=losses, rouges=rouges,
                      rouge_l=sum(rouges) / len(rouges) if rouges else None,
                      matched=sum(r >= 0.8 for r in rouges) / len(rouges) if rouges else None)


def judge_pooled(sites: Sequence[SiteScores], policy: GateSettings) -> GateReport:
    """The gate's verdict (`learners.gate.judge`) on the sites' probes pooled window by window.

    The canary is general text, the same at every site: the one that drifted most is judged.
    """
    if not sites:
        raise ValueError("no site's scores to judge")
    pooled: dict[str, dict[int, WindowScore]] = {}
    replies: dict[str, dict[int, ReplyScore]] = {}
    # Only a window both versions were scored on at a site, so the two pools pair probe by probe.
    scored = [{w for w in s.candidate if w in s.live} for s in sites]
    replied = [{w for w in s.replies_candidate if w in s.replies_live} for s in sites]
    for side in ("candidate", "live"):
        windows = [{w: score for w, score in s.windows(side).items() if w in both}
                   for s, both in zip(sites, scored, strict=True)]
        pooled[side] = {w: pooled_window([p[w] for p in windows if w in p]) for w in sorted(set().union(*scored))}
        answers = [{w: score for w, score in s.replies(side).items() if w in both}
                   for s, both in zip(sites, replied, strict=True)]
        replies[side] = {w: pooled_replies([p[w] for p in answers if w in p]) for w in sorted(set().union(*replied))}
    canaries = [s.canary for s in sites if s.canary is not None]
    return judge(pooled["candidate"], pooled["live"], sorted({w for s in sites for w in s.new_windows}), policy,
                 canary=max(canaries, key=lambda c: c.drift) if canaries else None,
                 replies=(replies["candidate"], replies["live"]))
