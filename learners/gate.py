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

Probes are answered as `/v1/classify` answers, the model's scores weighed with the buffer's vote,
so the gate judges what users get; except whether the new windows were learned at all, which is
judged on the model's own answers. The vote echoes whatever labels the buffer holds, wrong ones
too: when every ticket of a window carries another intent than its own (the demo's scrambled
window once did), its neighbours do as well, so the vote agrees with a probe's wrong label more
often than chance (0.35 with the vote against 0.16 by chance, p = 0.03).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from learners.config import GateSettings
from learners.reports import TEST_NAME, Canary, Check, GateReport, ReplyScore, WindowScore
from learners.scoring import LabelScorer, with_votes
from learners.stats import (
    LabelDependence,
    PairedTest,
    label_dependence,
    paired_increase,
    paired_regression,
    smallest_p_value,
)
from streams.records import TicketRecord

# A version's log-likelihood of each label it was scored on, by probe id then label.
CachedScores = Mapping[str, Mapping[str, float]]
# The buffer's vote on each probe (`replay.shortlist.vote_shares`), by probe id then label.
Votes = Mapping[str, Mapping[str, float]]


@dataclass(frozen=True)
class ProbeMatrix:
    """One window's labelled probes and their scores (probes × the scorer's labels): each
    probe's judged labels scored, -inf for the others, as `LabelScorer.score_among` gives them."""

    records: list[TicketRecord]
    scores: torch.Tensor
    shortlisted: int  # probes judged among a shortlist rather than every label
    reused: int  # (probe, label) scores taken from those cached
    computed: int  # (probe, label) scores the model was run for


def finite_scores(matrices: Mapping[int, ProbeMatrix], labels: Sequence[str]) -> dict[str, dict[str, float]]:
    """Every window's finite scores by probe id and label, as `score_probes` takes them back.

    >>> records = [TicketRecord(id="p1", text="t", label="a")]
    >>> matrix = ProbeMatrix(records, torch.tensor([[-0.5, -math.inf]]), shortlisted=1, reused=0, computed=1)
    >>> finite_scores({1: matrix}, ["a", "b"])
    {'p1': {'a': -0.5}}
    """
    return {r.id: {labels[c]: float(row[c]) for c in row.isfinite().nonzero()[:, 0].tolist()}
            for matrix in matrices.values() for r, row in zip(matrix.records, matrix.scores, strict=True)}


def score_probes(model: nn.Module, scorer: LabelScorer, probes: Mapping[int, Sequence[TicketRecord]],
                 shortlists: Mapping[str, Sequence[str]] | None = None, cached: CachedScores | None = None,
                 ) -> dict[int, ProbeMatrix]:
    """Score every labelled probe of every window (windows without labelled probes are left out).

    With `shortlists` (probe id → labels), a probe that has one is scored among those labels
    only, otherwise among every label. A (probe, label) score found in `cached` is taken from
    there, not from the model: a version's score of a label never changes (a probe's text is
    fixed by its id, a version's weights once published) and does not depend on which other
    labels are scored with it. The model runs only for the pairs missing: not at all for a
    window that has none.
    """
    index = {label: i for i, label in enumerate(scorer.labels)}
    shortlists, cached = shortlists or {}, cached or {}
    result: dict[int, ProbeMatrix] = {}
    for window, records in probes.items():
        labelled = [r for r in records if r.label in index]
        if not labelled:
            continue
        wanted = [scorer.judged_among(shortlists.get(r.id, ())) for r in labelled]
        scores = torch.full((len(labelled), len(index)), -math.inf)
        missing: list[list[str]] = []
        for row, (record, labels) in enumerate(zip(labelled, wanted, strict=True)):
            have = cached.get(record.id, {})
            hits = [label for label in labels if label in have]
            scores[row, [index[label] for label in hits]] = torch.tensor([have[label] for label in hits])
            missing.append([label for label in labels if label not in have])
        rows = [row for row, labels in enumerate(missing) if labels]
        if rows:
            fresh = scorer.score_among(model, [labelled[row].text for row in rows], [missing[row] for row in rows])
            for at, row in enumerate(rows):
                columns = [index[label] for label in missing[row]]
                scores[row, columns] = fresh[at, columns]
        computed = sum(len(labels) for labels in missing)
        result[window] = ProbeMatrix(
            records=labelled, scores=scores, shortlisted=sum(1 for r in labelled if shortlists.get(r.id)),
            reused=sum(len(labels) for labels in wanted) - computed, computed=computed)
    return result


def vote_matrix(records: Sequence[TicketRecord], labels: Sequence[str], votes: Votes | None) -> torch.Tensor:
    """The buffer's vote shares as `with_votes` takes them: records × labels, 0 where none.

    >>> vote_matrix([TicketRecord(id="p1", text="t"), TicketRecord(id="p2", text="t")], ["a", "b"],
    ...             {"p2": {"b": 0.75, "a": 0.25, "gone": 0.5}}).tolist()
    [[0.0, 0.0], [0.25, 0.75]]
    """
    index, votes = {label: i for i, label in enumerate(labels)}, votes or {}
    shares = torch.zeros(len(records), len(labels))
    for row, record in enumerate(records):
        for label, share in votes.get(record.id, {}).items():
            if label in index:
                shares[row, index[label]] = share
    return shares


def window_score(matrix: ProbeMatrix, labels: Sequence[str], known: Collection[str] = (),
                 votes: Votes | None = None, vote_weight: float = 0.0) -> WindowScore:
    """A window's scores judged: each probe answered with its best label, as `/v1/classify` would
    answer it: the model's scores weighed with the buffer's `votes` (`with_votes`).

    With `known` labels, each probe of one of them is also judged among those labels only: the
    same scores, the argmax restricted to their columns, so it costs nothing more. A probe whose
    true label was not scored (not on its shortlist) is wrong. `loss` is the model's own.
    """
    index, known = {label: i for i, label in enumerate(labels)}, set(known)
    columns = torch.tensor([i for i, label in enumerate(labels) if label in known], dtype=torch.long)
    records, scores = matrix.records, matrix.scores
    truth = torch.tensor([index[r.label] for r in records if r.label is not None])
    picked = torch.log_softmax(scores, dim=1).gather(1, truth[:, None])[:, 0]
    scored = picked.isfinite()  # the true label was scored (on the probe's shortlist)
    answer = with_votes(scores, vote_matrix(records, labels, votes), vote_weight)
    correct = ((answer.argmax(dim=1) == truth) & scored).tolist()
    among_known = torch.isin(truth, columns)
    known_correct = ((columns[answer[among_known][:, columns].argmax(dim=1)] == truth[among_known])
                     & scored[among_known]).tolist() if len(columns) else []
    return WindowScore(
        accuracy=sum(correct) / len(correct),
        truth=tuple(r.label or "" for r in records),
        answers=tuple(labels[i] for i in answer.argmax(dim=1).tolist()),
        model_answers=tuple(labels[i] for i in scores.argmax(dim=1).tolist()),
        model_scores=tuple(map(tuple, torch.log_softmax(scores, dim=1).tolist())),
        labels=tuple(labels),
        loss=float(-picked[scored].mean()) if scored.any() else math.nan,
        n=len(records),
        correct=tuple(correct),
        majority_rate=max(Counter(r.label for r in records).values()) / len(records),
        known_accuracy=sum(known_correct) / len(known_correct) if known_correct else None,
        known_correct=tuple(known_correct),
        shortlisted=matrix.shortlisted,
    )


def window_scores(matrices: Mapping[int, ProbeMatrix], labels: Sequence[str], known: Collection[str] = (),
                  votes: Votes | None = None, vote_weight: float = 0.0) -> dict[int, WindowScore]:
    """`window_score` of every window."""
    return {window: window_score(matrix, labels, known, votes, vote_weight) for window, matrix in matrices.items()}


def evaluate(model: nn.Module, scorer: LabelScorer, probes: Mapping[int, Sequence[TicketRecord]],
             known: Collection[str] = (), shortlists: Mapping[str, Sequence[str]] | None = None,
             votes: Votes | None = None, vote_weight: float = 0.0) -> dict[int, WindowScore]:
    """Score every window's probes (`score_probes`) and judge them (`window_score`)."""
    return window_scores(score_probes(model, scorer, probes, shortlists), scorer.labels, known, votes, vote_weight)


def learning_test(new: WindowScore, earlier: Sequence[WindowScore] = (),
                  alpha: float = 0.05) -> tuple[LabelDependence, str] | None:
    """Whether the model's own scores on a new window's probes depend on the probes' labels: the
    probability of each probe's label among the labels the window's probes carry (`label_dependence`).

    Where no answers could pass that test at `alpha` (`smallest_p_value`: probes of one label, a
    window of one new intent; or one probe of a rare intent beside four of a common one), the new
    labels' probability on the window's probes is set against theirs on the earlier windows'
    probes, the probes dealt at random between the two. With no earlier probes either (a stream's
    first window, of one intent), or no probe, there is nothing to judge: None. Else the test and
    what it compared, for the report.
    """
    truth = list(new.truth)
    carried = sorted(set(truth))
    if smallest_p_value(truth) >= alpha:
        if not truth or not any(score.truth for score in earlier):
            return None
        given = np.array([p for score in [new, *earlier] for p in score.probabilities(carried)])
        test = label_dependence(np.column_stack([given, 1 - given]), [0] * len(truth) + [1] * (len(given) - len(truth)))
        return (LabelDependence(float(given[:len(truth)].mean()), float(given.mean()), test.p_value),
                "too few probes of a second label to judge among them: the model's own probability of the new "
                "labels on the window's probes against on earlier windows' probes")
    rows = [[row[new.labels.index(label)] for label in carried] for row in new.model_scores]
    probabilities = torch.softmax(torch.tensor(rows, dtype=torch.float64).reshape(len(truth), len(carried)), dim=1)
    # A probe none of whose labels was on its shortlist: no preference (a row of -inf is NaN).
    probabilities = probabilities.nan_to_num(1 / max(len(carried), 1)).numpy()
    return (label_dependence(probabilities, [carried.index(label) for label in truth]),
            "the model's own probability of each probe's label among the labels the window's probes carry")


def judge(candidate: dict[int, WindowScore], live: dict[int, WindowScore], new_windows: Sequence[int],
          policy: GateSettings, *, best_before: Mapping[int, float] | None = None,
          base: dict[int, WindowScore] | None = None, canary: Canary | None = None,
          replies: tuple[dict[int, ReplyScore], dict[int, ReplyScore]] = ({}, {})) -> GateReport:
    """Apply every check of the policy; the first failing one gives the reason.

    `replies`: the candidate's and the live version's replies on earlier windows' reply probes
    (`learners.replies.score_replies`), judged pooled, probe by probe (`reply_checks`).

    Earlier windows' forgetting checks use the scores among the known labels when both sides
    have them (see `window_score`), else the scores among all labels. `best_before` is each earlier
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
        test = paired_regression(before, after)
        return significant_loss(name, observed, threshold, test, policy.alpha,
                                f"{test.lost} probes lost, {test.gained} gained")

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
    on_earlier_windows = len(checks)
    if new:  # the new windows must be learned: no significant loss against live, pooled
        gain = sum(candidate[w].accuracy - live[w].accuracy for w in new) / len(new)
        checks.append(regression("new windows worse than live", [c for w in new for c in live[w].correct],
                                 [c for w in new for c in candidate[w].correct], -gain, -policy.min_gain))
    learning_of: dict[int, int] = {}  # id of a learning check -> its window
    if policy.require_learning:  # and beyond chance, each window as if it were learned alone: pooled,
        # a well-learned window (one tried again after a refusal, say) carries a scrambled one past the test
        for w in new:
            checks.append(learning_check(w, candidate[w], [candidate[o] for o in old], policy.alpha))
            learning_of[id(checks[-1])] = w
    replying = reply_checks(*replies, policy)
    checks += replying
    # What the candidate did to earlier windows, as opposed to how it learned its own windows or
    # kept general ability: a rejection for these alone says nothing against the new tickets.
    harm_to_earlier = {id(c) for c in checks[:on_earlier_windows] + replying}
    if canary is not None and policy.max_canary_increase is not None:
        checks.append(Check(name="canary loss increase over the base model",
                            passed=canary.drift <= policy.max_canary_increase, observed=canary.drift,
                            threshold=policy.max_canary_increase))

    failures = [c for c in checks if not c.passed]
    failed = failures[0] if failures else None
    if failed is None:
        reason = (f"passed all {len(checks)} checks" if checks else "nothing to compare yet") + \
                 f" (alpha {policy.alpha})"
    else:
        p = f", p = {failed.p_value:.3g}" if failed.p_value is not None else ""
        reason = f"{failed.name}: {failed.observed:.3f} against threshold {failed.threshold:.3f}{p}"
        if failed.detail:
            reason += f" ({failed.detail})"
    retryable = bool(failures) and all(id(c) in harm_to_earlier for c in failures)
    at_fault: tuple[int, ...] = ()
    if failures and not retryable:
        if all(id(c) in harm_to_earlier or id(c) in learning_of for c in failures):
            at_fault = tuple(sorted({learning_of[id(c)] for c in failures if id(c) in learning_of}))
        else:  # the canary, or the new windows worse than live: nothing tells which window is to blame
            at_fault = tuple(new_windows)
    return GateReport(passed=failed is None, reason=reason, test=TEST_NAME, new_windows=tuple(new_windows),
                      retryable=retryable, at_fault=at_fault,
                      candidate=candidate, live=live, base=base or {}, checks=checks, canary=canary,
                      thresholds=policy, replies_candidate=replies[0], replies_live=replies[1])


def learning_check(window: int, new: WindowScore, earlier: Sequence[WindowScore], alpha: float) -> Check:
    """Whether `window` was learned beyond chance, by the model's own scores: the buffer's vote
    echoes whatever labels it holds (`learning_test`)."""
    name = f"window {window} learned beyond chance"
    learning = learning_test(new, earlier, alpha)
    if learning is None:  # no answers could be significant, and nothing earlier to set them against
        return Check(name=name, passed=True, observed=1.0, threshold=1.0,
                     detail="not judged: its probes are too few, or of one label, and no earlier window has probes")
    test, compared = learning
    return Check(name=name, passed=test.p_value < alpha, observed=test.observed, threshold=test.chance,
                 p_value=test.p_value, detail=f"{compared}, without the buffer's vote; chance: the labels dealt to "
                                              "the probes at random")


def significant_loss(name: str, observed: float, threshold: float, test: PairedTest, alpha: float,
                     detail: str) -> Check:
    """The gate's rule for every regression check: it fails only when the `observed` loss passes
    its `threshold` and the paired `test` finds it significant, so noise alone fails no update."""
    return Check(name=name, passed=not (observed > threshold and test.p_value < alpha), observed=observed,
                 threshold=threshold, p_value=test.p_value, detail=detail)


def reply_checks(candidate: Mapping[int, ReplyScore], live: Mapping[int, ReplyScore],
                 policy: GateSettings) -> list[Check]:
    """Earlier windows' replies, pooled: the answer loss may not rise, nor the greedy answers'
    ROUGE-L fall, past its threshold and significantly (one-sided paired permutation test)."""
    windows = [w for w in sorted(candidate) if w in live]
    checks = []
    for name, before, after, threshold in (
            ("reply loss increase on earlier windows", [x for w in windows for x in live[w].losses],
             [x for w in windows for x in candidate[w].losses], policy.max_reply_loss_increase),
            ("reply ROUGE-L drop on earlier windows", [-x for w in windows for x in live[w].rouges],
             [-x for w in windows for x in candidate[w].rouges], policy.max_reply_rouge_drop)):
        if threshold is None or not before:
            continue
        test = paired_increase(before, after)
        checks.append(significant_loss(name, (sum(after) - sum(before)) / len(before), threshold, test,
                                       policy.alpha, f"{test.lost} probes worse, {test.gained} better"))
    return checks
