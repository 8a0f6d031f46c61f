"""What the buffer says about the tickets an update judges: each probe's nearest labelled
neighbours (the labels it is judged among, and their vote), and each training row's, as
`/v1/classify` would hear them for a new ticket like it (a search's validation)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from learners.config import GateSettings
from replay.buffer import ReplayBuffer
from streams.records import TicketRecord


def probe_neighbours(buffer: ReplayBuffer, probes: Mapping[int, Sequence[TicketRecord]], labels: Sequence[str],
                     gate: GateSettings) -> tuple[dict[str, list[str]], dict[str, dict[str, float]]]:
    """What each probe's nearest labelled training tickets (probe rows do not vote) say about it
    (`ReplayBuffer.advise`), by probe id: the labels it is judged among (absent: every label), and
    the buffer's vote on it (absent: no vote)."""
    rows = [r for window in probes.values() for r in window if r.label]
    advice = buffer.advise([r.text for r in rows], labels, gate.shortlist_labels, gate.shortlist_neighbours,
                           probes=False)
    return ({r.id: a.shortlist for r, a in zip(rows, advice, strict=True) if a.shortlist},
            {r.id: a.votes for r, a in zip(rows, advice, strict=True) if a.votes})


def held_out_votes(buffer: ReplayBuffer, rows: Sequence[TicketRecord],
                   labels: Sequence[str]) -> dict[str, dict[str, float]]:
    """The buffer's vote on each labelled row as `/v1/classify` would give it on a new ticket like
    it: every stored ticket votes but the row's own copy. A search scores its trials on rows held
    out of training with these (`learners.validation.validation_scores`)."""
    rows = [r for r in rows if r.label]
    advice = buffer.advise([r.text for r in rows], labels, 0, 0, left_out=[r.id for r in rows])
    return {r.id: a.votes for r, a in zip(rows, advice, strict=True) if a.votes}
