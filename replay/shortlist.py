"""The buffer's vote on a ticket's label: shortlists of the labels worth scoring, and vote shares.

Scoring a ticket's label log-likelihoods costs in proportion to the label tokens. A ticket's
nearest labelled neighbours in the buffer (by the embedding the buffer already stores) nearly
always carry its true label among a handful of theirs, so scoring a fixed number `size` of
those keeps a classification's cost the same at 12 labels and at 300. `ReplayBuffer.
neighbour_labels` finds the neighbours; this module only ranks their labels, so the same
function serves `/v1/classify` and (with probe rows left out of the votes) per-probe shortlists.

The same neighbours also answer, in part: `vote_shares` is how the nearest few split their votes
among the candidates, which `learners.scoring.with_votes` weighs with the model's own scores. The
buffer never forgets a stored ticket, so the vote keeps an earlier window's intents where the
model, trained on its newest windows most, leans towards them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

Neighbour = tuple[str, float]  # a labelled neighbour's label and its cosine similarity


@dataclass(frozen=True)
class Advice:
    """What a ticket's nearest labelled neighbours say about it: the labels worth scoring (None:
    score every candidate) and the vote shares the answer weighs in (empty: no vote)."""

    shortlist: list[str] | None = None
    votes: dict[str, float] = field(default_factory=dict)


def advise(neighbours: Sequence[Neighbour], candidates: Sequence[str], size: int, shortlist_neighbours: int,
           vote_neighbours: int) -> Advice:
    """The one rule serving and the gate both follow: shortlist `size` of `candidates` by the
    nearest `shortlist_neighbours` when there are more candidates than that (and `size` is not 0),
    and take the vote of the nearest `vote_neighbours` (0: no vote).

    >>> near = [("pin", 0.9), ("card_lost", 0.8), ("pin", 0.7)]
    >>> advise(near, ["pin", "card_lost", "top_up"], 2, 64, 0)
    Advice(shortlist=['pin', 'card_lost'], votes={})
    >>> advice = advise(near, ["pin", "card_lost"], 2, 64, 2)  # two candidates: nothing to shortlist
    >>> advice.shortlist, {label: round(share, 3) for label, share in advice.votes.items()}
    (None, {'pin': 0.529, 'card_lost': 0.471})
    """
    shortlisting = bool(size) and len(candidates) > size
    short = shortlist(neighbours[:shortlist_neighbours], candidates, size) if shortlisting else []
    return Advice(short or None, vote_shares(neighbours, candidates, vote_neighbours) if vote_neighbours else {})


def shortlist(neighbours: Sequence[Neighbour], allowed: Sequence[str], size: int) -> list[str]:
    """The `size` labels to score: neighbours' labels by votes, topped up from `allowed`.

    A label's vote is the summed cosine of the neighbours that carry it, so a label held by
    several close tickets ranks above one held by a single, farther one. Only labels in
    `allowed` (those the serving version knows) count. When the neighbours name fewer than
    `size` of them, the rest of `allowed` tops the list up in its own order, so every pass
    scores the same number of labels. Without any allowed neighbour there is nothing to
    shortlist by: the answer is empty, and the caller scores every label.

    Parameters
    ----------
    neighbours
        (label, cosine) of a ticket's nearest labelled tickets, nearest first (equal votes
        keep this order).
    allowed
        The candidate labels, in the order the top-up takes them.
    size
        How many labels to return (fewer only when `allowed` holds fewer).

    Examples
    --------
    >>> near = [("card_arrival", 0.9), ("card_lost", 0.8), ("card_lost", 0.7), ("pin", 0.6)]
    >>> shortlist(near, ["card_arrival", "card_lost", "pin", "top_up"], 2)
    ['card_lost', 'card_arrival']
    >>> shortlist(near, ["top_up", "pin", "fee", "card_lost"], 3)  # card_arrival is not known
    ['card_lost', 'pin', 'top_up']
    >>> shortlist([], ["top_up", "pin"], 1)  # no neighbour: score everything
    []
    """
    votes: defaultdict[str, float] = defaultdict(float)
    known = set(allowed)
    for label, cosine in neighbours:
        if label in known:
            votes[label] += cosine
    if not votes:
        return []
    ranked = sorted(votes, key=lambda label: -votes[label])  # stable: on a tie the nearer label first
    ranked += [label for label in allowed if label not in votes]
    return ranked[:size]


def vote_shares(neighbours: Sequence[Neighbour], allowed: Sequence[str], k: int) -> dict[str, float]:
    """Each label's share of the summed cosine of the `k` nearest neighbours carrying one of
    `allowed`; labels that none of them carries are left out (their share is 0).

    >>> near = [("card_arrival", 0.9), ("pin", 0.85), ("card_lost", 0.8), ("card_lost", 0.7)]
    >>> {label: round(share, 3) for label, share in vote_shares(near, ["card_lost", "pin"], 2).items()}
    {'pin': 0.515, 'card_lost': 0.485}
    >>> vote_shares([], ["pin"], 16)
    {}
    """
    votes: defaultdict[str, float] = defaultdict(float)
    known = set(allowed)
    for label, cosine in [n for n in neighbours if n[0] in known][:k]:
        votes[label] += max(cosine, 0.0)
    total = sum(votes.values())
    return {label: vote / total for label, vote in votes.items()} if total > 0 else {}
