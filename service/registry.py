"""The adapter registry: immutable version directories and a live pointer that moves.

Layout under `root`::

    versions/v0003/adapter_config.json        PEFT layout, loadable by PeftModel.from_pretrained
    versions/v0003/adapter_model.safetensors
    versions/v0003/ewc.safetensors            Fisher and anchor for the next warm start (EWC on)
    versions/v0003/evergreen.json             metadata: parent, windows, labels, gate report
    live.json                                 {"live": "v0003", "history": ["v0000", ...], "since": t}

Every write is a temporary file or directory, fsynced, then renamed: a crash at any moment
leaves the previous live version intact. Names are never reused, rejected ones included.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from learners.reports import GateReport, RoundReport

Verdict = Literal["accepted", "rejected"]
_NAME = re.compile(r"^v\d{4,}$")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
METADATA = "evergreen.json"


class RegistryError(Exception):
    """A request the registry refuses (unknown version, unsafe files, nothing to roll back to)."""


class VersionMetadata(BaseModel):
    """What the writer of a version says about it when it publishes it."""

    parent: str | None = Field(description="The version it was warm-started from.")
    verdict: Verdict = Field(description="The gate's; only accepted versions are promoted without an override.")
    windows_trained: list[int]
    labels: list[str]
    gate: GateReport | None = Field(default=None, description="None for a version that was never gated (the first).")
    train: RoundReport | None = None


class Override(BaseModel):
    """An admin's decision against the gate's verdict."""

    action: Literal["promote"]
    at: float = Field(description="Unix time.")


class VersionInfo(VersionMetadata):
    """A published version's metadata (`evergreen.json`), with what the registry adds."""

    name: str
    created_at: float
    overrides: list[Override] = []


@dataclass(frozen=True)
class Draft:
    """A version being written: its name is reserved, its files go into `path` (`vNNNN.tmp`)."""

    name: str
    path: Path


def fsync_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AdapterRegistry:
    """Versions on disk, keyed by name; `live` is the one the service answers with."""

    def __init__(self, root: Path, writer: bool = True) -> None:
        """`writer=False` for a serve-only replica sharing the directory: it must never clean up
        a temporary directory, which may be the primary's candidate being written."""
        self.root = root
        self.versions_dir = root / "versions"
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        # Called as listener(version, "promote" | "rollback") after the live pointer moved.
        self.listeners: list[Callable[[str, str], None]] = []
        if writer:
            for leftover in self.versions_dir.glob("*.tmp"):
                shutil.rmtree(leftover)  # a version whose writer crashed never became a version

    # -- reading ----------------------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(p.name for p in self.versions_dir.iterdir() if _NAME.match(p.name))

    def info(self, name: str) -> VersionInfo:
        path = self.path(name) / METADATA
        return VersionInfo.model_validate_json(path.read_text())

    def path(self, name: str) -> Path:
        """Directory of a version; only names the registry made, never a caller's path."""
        if not _NAME.match(name) or not (self.versions_dir / name).is_dir():
            raise RegistryError(f"unknown adapter version {name!r}")
        directory = self.versions_dir / name
        if not (directory / ADAPTER_WEIGHTS).is_file():
            raise RegistryError(f"version {name!r} has no {ADAPTER_WEIGHTS}: only safetensors load")
        return directory

    def _pointer(self) -> dict[str, Any]:
        path = self.root / "live.json"
        return json.loads(path.read_text()) if path.exists() else {"live": None, "history": []}

    @property
    def live(self) -> str | None:
        live: str | None = self._pointer()["live"]
        return live

    @property
    def live_since(self) -> float | None:
        """When the live pointer last moved (None for a pointer written before this was kept)."""
        since: float | None = self._pointer().get("since")
        return since

    # -- writing ----------------------------------------------------------------------------
    @contextmanager
    def draft(self) -> Iterator[Draft]:
        """Reserve the next name for a version written into `Draft.path`, published by `publish`.

        Whatever leaves the block unpublished (an error, or no `publish` call) is removed, and
        so is the directory of a process killed inside it, at the next start.
        """
        with self._lock:  # two drafts never get the same name
            taken = [int(m.group(1)) for p in self.versions_dir.iterdir()
                     if (m := re.match(r"^v(\d{4,})(\.tmp)?$", p.name))]
            name = f"v{max(taken) + 1 if taken else 0:04d}"
            draft = Draft(name, self.versions_dir / f"{name}.tmp")
            draft.path.mkdir()
        try:
            yield draft
        finally:
            shutil.rmtree(draft.path, ignore_errors=True)  # gone already once published

    def publish(self, draft: Draft, metadata: VersionMetadata) -> VersionInfo:
        """Write the metadata, fsync every file, and rename the draft into a version: until the
        rename it does not exist, after it it is complete."""
        if not (draft.path / ADAPTER_WEIGHTS).is_file():
            raise RegistryError(f"the draft of {draft.name} has no {ADAPTER_WEIGHTS}")
        info = VersionInfo(**dict(metadata), name=draft.name, created_at=time.time())
        fsync_write(draft.path / METADATA, info.model_dump_json(indent=2).encode())
        for file in draft.path.iterdir():
            with file.open("rb") as handle:
                os.fsync(handle.fileno())
        draft.path.replace(self.versions_dir / draft.name)
        _fsync_dir(self.versions_dir)
        return info

    def record(self, info: VersionInfo) -> None:
        """Rewrite a version's metadata (its weights never change)."""
        fsync_write(self.path(info.name) / METADATA, info.model_dump_json(indent=2).encode())

    def promote(self, name: str) -> None:
        """Move the live pointer to `name` (atomically)."""
        with self._lock:
            self.path(name)
            pointer = self._pointer()
            if pointer["live"] == name:
                return
            history = [*pointer["history"], name]
            fsync_write(self.root / "live.json",
                         json.dumps({"live": name, "history": history, "since": time.time()}).encode())
        self._moved(name, "promote")

    def _moved(self, name: str, event: str) -> None:
        for listener in self.listeners:
            listener(name, event)

    def previous_live(self) -> str:
        """The version that was live before the current one."""
        history = self._pointer()["history"]
        if len(history) < 2:
            raise RegistryError("no earlier live version to roll back to")
        previous: str = history[-2]
        return previous

    def rollback(self) -> str:
        """Move the live pointer back to the version that was live before; returns it."""
        with self._lock:
            history = self._pointer()["history"]
            previous = self.previous_live()
            fsync_write(self.root / "live.json",
                         json.dumps({"live": previous, "history": history[:-1], "since": time.time()}).encode())
        self._moved(previous, "rollback")
        return previous
