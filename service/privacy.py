"""The privacy ledger: every differentially private round this service ran, for its whole life.

An update under `train.privacy` is written here before its training process starts, so a round
that crashes or is cancelled still counts (its weights may have been read), and ε only grows.
The ledger is JSON lines of plain numbers in the data directory: nothing unpickled. A last line
torn by a crash mid-write is cut off (its round never started); any other line that is not an
entry stops the service: skipping it would under-state ε.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from learners.config import PrivacySettings
from learners.privacy import epsilon
from learners.reports import PrivateRound

LOG = logging.getLogger(__name__)
LEDGER_FILE = "privacy.jsonl"
RECENT = 20  # rounds `GET /v1/privacy` lists: its answer stays small after a year of updates


class LedgerEntry(BaseModel):
    update: int = Field(description="The update that ran the round.")
    at: float = Field(description="When it was entered, Unix seconds (before training started).")
    round: PrivateRound


class PrivacyStatus(BaseModel):
    """What this service's differentially private updates have spent (`train.privacy`)."""

    enabled: bool
    delta: float = Field(description="δ of the guarantee every ε here is stated at.")
    epsilon_spent: float = Field(description="ε of every round so far together (Opacus's RDP accountant): what "
                                             "any one ticket, replayed in every round, may have given away.")
    epsilon_budget: float
    rounds: int = Field(description="Private rounds entered over the service's life.")
    recent: list[LedgerEntry] = Field(description=f"The newest {RECENT} of them, oldest first.")
    refused: str | None = Field(description="Why the last update was refused by the budget, if it was (since "
                                            "this process started); updates are refused until the budget grows.")


class PrivacyLedger:
    def __init__(self, path: Path, settings: PrivacySettings, repair: bool = True) -> None:
        """`repair=False` for a replica sharing the registry: a torn last line may be the primary's
        entry being written, so it is left out of the reading, not cut off the file."""
        self.path = path
        self.settings = settings
        self.refused: str | None = None
        self._lock = threading.Lock()
        self.entries = self._load(repair)
        self.spent = epsilon([e.round for e in self.entries], settings.delta)  # read at every scrape

    def _load(self, repair: bool) -> list[LedgerEntry]:
        data = self.path.read_bytes() if self.path.exists() else b""
        if not data.endswith(b"\n") and data:
            data = data[:data.rfind(b"\n") + 1]
            if repair:
                LOG.warning("cutting a line torn by a crash off the end of %s", self.path)
                with self.path.open("r+b") as ledger:
                    ledger.truncate(len(data))
        entries = []
        for number, line in enumerate(data.splitlines(), 1):
            try:
                entries.append(LedgerEntry.model_validate_json(line))
            except ValidationError as exc:
                raise ValueError(f"line {number} of the privacy ledger {self.path} is not an entry, and ε cannot "
                                 f"be known without it: restore the file") from exc
        return entries

    def admit(self, update: int, planned: PrivateRound, stored: int) -> str | None:
        """Enter the round if the budget can pay for it and δ suits `stored` tickets; else why not."""
        with self._lock:
            after = epsilon([*(e.round for e in self.entries), planned], self.settings.delta)
            if self.settings.delta * stored >= 1:
                self.refused = (f"train.privacy.delta {self.settings.delta:g} is not below 1 / the {stored} tickets "
                                f"stored: the guarantee would mean nothing; lower it")
            elif after > self.settings.epsilon_budget:
                self.refused = (f"privacy budget spent: this round would take ε from {self.spent:.2f} to "
                                f"{after:.2f}, over train.privacy.epsilon_budget {self.settings.epsilon_budget:g} "
                                f"(δ = {self.settings.delta:g}); this service trains no more")
            else:
                entry = LedgerEntry(update=update, at=time.time(), round=planned)
                with self.path.open("a") as ledger:
                    ledger.write(json.dumps(entry.model_dump(mode="json")) + "\n")
                    ledger.flush()
                    os.fsync(ledger.fileno())
                self.entries.append(entry)
                self.spent, self.refused = after, None
            return self.refused

    def status(self) -> PrivacyStatus:
        return PrivacyStatus(enabled=self.settings.enabled, delta=self.settings.delta, epsilon_spent=self.spent,
                             epsilon_budget=self.settings.epsilon_budget, rounds=len(self.entries),
                             recent=self.entries[-RECENT:],
                             refused=self.refused)
