"""The forgetting gate: the candidate against the live version on every window's probe set.

A regression counts only when it is both past its threshold and statistically significant on
the same probe records (exact one-sided McNemar test at `alpha`): small probe sets are noisy,
and the gate must neither wave real forgetting through nor block good updates at random.

Earlier windows are judged twice. Forgetting proper is measured among the labels the live
version already knew: can the candidate still tell the old intents apart? Scored against every
label, old probes also meet the new window's intents, and a healthy update that learns an intent
close to an old one (BANKING77 has many) loses a few old probes to it, as joint training would:
that is interference, held to its own, looser bound, which still catches a candidate that
answers everything with the newest labels.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection, Mapping, Sequence

import torch
from torch import nn

from learners.config import GateSettings
from learners.reports import TEST_NAME, Canary, Check, GateReport, WindowScore
from learners.scoring import LabelScorer
from learners.stats import chance_agreement, paired_regression, permutation_tail
from streams.records import TicketRecord


def evaluate(model: nn.Module, scorer: LabelScorer, probes: Mapping[int, Sequence[TicketRecord]],
             known: Collection[str] = (), shortlists: Mapping[str, Sequence[str]] | None = None,
             ) -> dict[int, WindowScore]:
    """Score every labelled probe of every window (windows without labelled probes are left out).

    With `known` labels, each probe of one of them is also judged among those labels only: the
    same scores, the argmax restricted to their columns, so it costs nothing more. With
    `shortlists` (probe id → labels), a probe that has one is judged among those labels only
    (`LabelScorer.score_among`); a probe whose true label is not on it is wrong.
    """
    index = {label: i for i, label in enumerate(scorer.labels)}
    known = set(known)
    columns = torch.tensor([index[label] for label in scorer.labels if label in known], dtype=torch.long)
    result: dict[int, WindowScore] = {}
    for window, records in probes.items():
        labelled = [r for r in records if r.label in index]
        if not labelled:
            continue
        texts = [r.text for r in labelled]
        own = [(shortlists or {}).get(r.id, ()) for r in labelled]
        scores = scorer.score_among(model, texts, own) if any(own) else scorer.score_many(model, texts)
        truth = torch.tensor([index[r.label] for r in labelled if r.label is not None])
        picked = torch.log_softmax(scores, dim=1).gather(1, truth[:, None])[:, 0]
        scored = picked.isfinite()  # the true label was scored (on the probe's shortlist)
        correct = ((scores.argmax(dim=1) == truth) & scored).tolist()
        among_known = torch.isin(truth, columns)
        known_correct = ((columns[scores[among_known][:, columns].argmax(dim=1)] == truth[among_known])
                         & scored[among_known]).tolist() if len(columns) else []
        result[window] = WindowScore(
            accuracy=sum(correct) / len(correct),
            truth=tuple(r.label or "" for r in labelled),
            answers=tuple(scorer.labels[i] for i in scores.argmax(dim=1).tolist()),
            loss=float(-picked[scored].mean()) if scored.any() else math.nan,
            n=len(labelled),
            correct=tuple(correct),
            majority_rate=max(Counter(r.label for r in labelled).values()) / len(labelled),
            known_accuracy=sum(known_correct) / len(known_correct) if known_correct else None,
            known_correct=tuple(known_correct),
            shortlisted=sum(1 for o in own if o),
        )
    return result


def judge(candidate: dict[int, WindowScore], live: dict[int, WindowScore], new_windows: Sequence[int],
          policy: GateSettings, *, best_before: Mapping[int, float] | None = None,
          base: dict[int, WindowScore] | None = None, canary: Canary | None = None) -> GateReport:
    """Apply every check of the policy; the first failing one gives the reason.

    Earlier windows' forgetting checks use the scores among the known labels when both sides
    have them (see `evaluate`), else the scores among all labels. `best_before` is each earlier
    window's best accuracy under earlier live versions (the forgetting reference); without it
    the live version's accuracy is used.
    """
    old = [w for w in sorted(candidate) if w not in new_windows and w in live]
    new = [w for w in new_windows if w in candidate and w in live]
    checks: list[Check] = []

    def known(score: WindowScore) -> tuple[float, tuple[bool, ...]]:
        if score.known_accuracy is None:
            return score.accuracy, score.correct
        return score.known_accuracy, score.known_correct

    def regression(name: str, before: Sequence[bool], after: Sequence[bool], observed: float,
                   threshold: float) -> Check:
        """Fails when `observed` passes `threshold` and the paired records show a significant loss."""
        test = paired_regression(before, after)
        return Check(name=name, passed=not (observed > threshold and test.p_value < policy.alpha),
                     observed=observed, threshold=threshold, p_value=test.p_value,
                     detail=f"{test.lost} probes lost, {test.gained} gained")

    for w in old:  # no earlier window may be forgotten, significantly, by more than max_drop
        (was, was_right), (now, now_right) = known(live[w]), known(candidate[w])
        check = regression(f"drop on window {w}", was_right, now_right, was - now, policy.max_drop)
        checks.append(check.model_copy(update={"detail": f"{was:.3f} → {now:.3f}, {check.detail}"}))
    if old:  # nor may the average forgetting exceed its bound, on the pooled probes
        reference = {w: max(known(live[w])[0], (best_before or {}).get(w, 0.0)) for w in old}
        forgetting = sum(reference[w] - known(candidate[w])[0] for w in old) / len(old)
        checks.append(regression("average forgetting", [c for w in old for c in known(live[w])[1]],
                                 [c for w in old for c in known(candidate[w])[1]], forgetting,
                                 policy.max_average_forgetting))
        # Among all labels: earlier windows' probes lost to the new intents.
        interference = sum(live[w].accuracy - candidate[w].accuracy for w in old) / len(old)
        checks.append(regression("interference of new labels with earlier windows",
                                 [c for w in old for c in live[w].correct],
                                 [c for w in old for c in candidate[w].correct], interference,
                                 policy.max_interference))
    if new:  # the new windows must be learned: no significant loss against live, and beyond chance
        gain = sum(candidate[w].accuracy - live[w].accuracy for w in new) / len(new)
        checks.append(regression("new windows worse than live", [c for w in new for c in live[w].correct],
                                 [c for w in new for c in candidate[w].correct], -gain, -policy.min_gain))
        if policy.require_learning:
            truth = [label for w in new for label in candidate[w].truth]
            answers = [label for w in new for label in candidate[w].answers]
            right = sum(t == a for t, a in zip(truth, answers, strict=True))
            p_value = permutation_tail(truth, answers)
            checks.append(Check(name="new windows learned beyond chance", passed=p_value < policy.alpha,
                                observed=right / len(truth) if truth else 0.0,
                                threshold=chance_agreement(truth, answers), p_value=p_value,
                                detail="chance: the same answers, independent of the labels"))
    if canary is not None and policy.max_canary_increase is not None:
        checks.append(Check(name="canary loss increase over the base model",
                            passed=canary.drift <= policy.max_canary_increase, observed=canary.drift,
                            threshold=policy.max_canary_increase))

    failed = next((c for c in checks if not c.passed), None)
    if failed is None:
        reason = (f"passed all {len(checks)} checks" if checks else "nothing to compare yet") + \
                 f" (alpha {policy.alpha})"
    else:
        p = f", p = {failed.p_value:.3g}" if failed.p_value is not None else ""
        reason = f"{failed.name}: {failed.observed:.3f} against threshold {failed.threshold:.3f}{p}"
        if failed.detail:
            reason += f" ({failed.detail})"
    return GateReport(passed=failed is None, reason=reason, test=TEST_NAME, new_windows=tuple(new_windows),
                      candidate=candidate, live=live, base=base or {}, checks=checks, canary=canary,
                      thresholds=policy)
