"""Curation: PII redaction and near-duplicates before storage, the label-disagreement vote after.

Redaction runs before embedding, so neither the stored text nor its vector carries the secret.
Numbers are redacted only when they validate (Luhn for cards, ISO 7064 mod 97 for IBANs), so
order numbers and amounts stay readable.

The disagreement vote (is a ticket likely mislabelled?) waits until its window closes, and then
asks the whole buffer, the window included: at ingest a new intent's first tickets have only
earlier intents for neighbours, and on a stream of close intents a whole window was flagged and
never replayed, so it was forgotten as soon as the next window was learned.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
# An IBAN: country, check digits, then 11-30 alphanumerics, optionally grouped by spaces.
IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b")
# Card candidates: 13-19 digits, optionally grouped by single spaces or dashes.
CARD = re.compile(r"\b\d(?:[ -]?\d){12,18}\b")
# Phones: an optional +country, then 7-15 digits grouped by spaces, dots, dashes or brackets.
PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]?\d{2,4}){1,4}\b")


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum every payment card number satisfies.

    Examples
    --------
    >>> luhn_valid("4111111111111111"), luhn_valid("4111111111111112")
    (True, False)
    """
    total = 0
    for i, char in enumerate(reversed(digits)):
        d = int(char)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_valid(candidate: str) -> bool:
    """ISO 13616 check: move the first four characters to the end, letters to numbers, mod 97.

    Examples
    --------
    >>> iban_valid("GB82 WEST 1234 5698 7654 32"), iban_valid("GB82 WEST 1234 5698 7654 33")
    (True, False)
    """
    compact = candidate.replace(" ", "")
    if not 15 <= len(compact) <= 34:
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def redact(text: str) -> tuple[str, Counter[str]]:
    """Replace PII with `[EMAIL]`, `[IBAN]`, `[CARD]`, `[PHONE]`; return the text and counts.

    Examples
    --------
    >>> redact("mail jo@example.com, card 4111 1111 1111 1111, order 1234")
    ('mail [EMAIL], card [CARD], order 1234', Counter({'email': 1, 'card': 1}))
    """
    counts: Counter[str] = Counter()
    kept: list[str] = []  # account-shaped numbers that failed their check: no later pattern sees them

    def sub(kind: str, pattern: re.Pattern[str], valid: object = None, protect: bool = False) -> None:
        nonlocal text

        def replace(match: re.Match[str]) -> str:
            found = match.group(0)
            if valid is not None and not valid(found):  # type: ignore[operator]
                if not protect:
                    return found
                kept.append(found)
                return f"\x00{len(kept) - 1}\x00"
            counts[kind] += 1
            return f"[{kind.upper()}]"

        text = pattern.sub(replace, text)

    # Order matters: IBANs and cards contain digit runs a phone pattern would also take.
    sub("email", EMAIL)
    sub("iban", IBAN, iban_valid, protect=True)
    sub("card", CARD, lambda s: luhn_valid(re.sub(r"\D", "", s)))
    sub("phone", PHONE, _phone_like)
    text = re.sub("\x00(\\d+)\x00", lambda m: kept[int(m.group(1))], text)
    return text, counts


DATE = re.compile(r"\d{1,4}[./-]\d{1,2}[./-]\d{1,4}")


def _phone_like(candidate: str) -> bool:
    digits = re.sub(r"\D", "", candidate)
    if DATE.fullmatch(candidate):  # 12.03.2024 is a date, not a number to hide
        return False
    # 7-15 digits (E.164); a grouped run or a leading + is what tells a phone from a plain count.
    return 7 <= len(digits) <= 15 and (candidate.startswith(("+", "(")) or bool(re.search(r"[ .()-]", candidate))
                                        or len(digits) >= 10)


def disagreement(label: str | None, neighbour_labels: Sequence[str | None], share: float) -> bool:
    """Whether the labelled neighbours agree, by at least `share`, on a label other than `label`.

    Examples
    --------
    >>> disagreement("card_arrival", ["exchange_rate"] * 4 + ["card_arrival"], 0.8)
    True
    >>> disagreement("card_arrival", ["exchange_rate"] * 3 + ["card_arrival"] * 2, 0.8)
    False
    """
    labelled = [n for n in neighbour_labels if n is not None]
    if label is None or len(labelled) < 3:  # too few votes to call anything mislabelled
        return False
    top, votes = Counter(labelled).most_common(1)[0]
    return top != label and votes / len(labelled) >= share


Neighbour = tuple[float, str]  # cosine, id of a stored ticket


def near_duplicates(records: Sequence[object], vectors: np.ndarray, neighbours: Sequence[Sequence[Neighbour]],
                    cosine: float) -> tuple[list[int], dict[int, str]]:
    """Decide a batch: positions to keep, and near-duplicates (position → id of the ticket it
    copies: a stored one, or an earlier one of the batch). `neighbours[i]` are record i's
    nearest stored tickets, best first.

    Examples
    --------
    >>> from streams.records import TicketRecord
    >>> rs = [TicketRecord(id="a", text="x"), TicketRecord(id="b", text="x"), TicketRecord(id="c", text="y")]
    >>> v = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], np.float32)
    >>> near_duplicates(rs, v, [[(0.5, "s")], [(0.5, "s")], [(0.99, "s")]], cosine=0.98)
    ([0], {1: 'a', 2: 's'})
    """
    similar = vectors @ vectors.T  # within the batch: a copy of an earlier kept ticket
    keep: list[int] = []
    skipped: dict[int, str] = {}
    for i, near in enumerate(neighbours):
        if near and near[0][0] >= cosine:
            skipped[i] = near[0][1]
            continue
        twin = next((j for j in keep if similar[i, j] >= cosine), None)
        if twin is not None:
            skipped[i] = records[twin].id  # type: ignore[attr-defined]
            continue
        keep.append(i)
    return keep, skipped
