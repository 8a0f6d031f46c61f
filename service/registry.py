"""The adapter registry: immutable version directories and a live pointer that moves.

Layout under `root`::

    versions/v0003/adapter_config.json        PEFT layout, loadable by PeftModel.from_pretrained
    versions/v0003/adapter_model.safetensors
    versions/v0003/ewc.safetensors            Fisher and anchor for the next warm start (EWC on)
    versions/v0003/evergreen.json             metadata: parent, windows, labels, gate report
    versions/v0003/exports/model-q8_0.gguf    GGUF exports made so far (`service/export.py`), each
    versions/v0003/exports/model-q8_0.gguf.sha256   with its sha256; pruned with the version
    live.json                                 {"live": "v0003", "history": ["v0000", ...], "since": t}

Every write is a temporary file or directory, fsynced, then renamed: a crash at any moment
leaves the previous live version intact. Names are never reused, rejected ones included.

`prune` bounds the disk: old rejected and superseded versions lose their files but keep their
`evergreen.json`, marked `pruned_at`, so lineage, quarantine and history still read it.

Listing, lineage and retention read every version, so the registry keeps an in-memory index of
each version's `Entry` (its metadata, with a summary of the gate report), re-reading a version's
file only when it has been replaced since: by this process, or by another sharing the directory.
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
from itertools import groupby
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from learners.reports import GateReport, GateSummary, RoundReport

Verdict = Literal["accepted", "rejected"]
_NAME = re.compile(r"^v\d{4,}$")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
METADATA = "evergreen.json"
EXPORTS = "exports"


def _number(name: str) -> int:
    """A version's place in creation order (by number: v10000 comes after v9999)."""
    return int(name[1:])


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
    pruned_at: float | None = Field(
        default=None, description="Unix time retention deleted its weights (None while it can be loaded).")


@dataclass(frozen=True)
class Entry:
    """What listing, lineage and retention read of a version: its metadata with the gate's
    summary instead of its report, and without the round's (a 300-window gate report parses
    to ~0.7 MB, its summary is the same size at any window)."""

    name: str
    parent: str | None
    verdict: Verdict
    windows_trained: tuple[int, ...]
    labels: tuple[str, ...]
    created_at: float
    gate: GateSummary | None  # the first version is never gated
    overrides: tuple[Override, ...]
    pruned_at: float | None

    @property
    def overridden(self) -> bool:
        """Promoted against the gate's verdict."""
        return bool(self.overrides)

    @classmethod
    def of(cls, info: VersionInfo) -> Entry:
        return cls(info.name, info.parent, info.verdict, tuple(info.windows_trained), tuple(info.labels),
                   info.created_at, None if info.gate is None else GateSummary.of(info.gate),
                   tuple(info.overrides), info.pruned_at)


Signature = tuple[int, int, int]


def file_signature(path: Path) -> Signature | None:
    """Changes whenever the file is rewritten: every write replaces it (a new inode), so this
    holds even where mtimes are coarse. None when there is no file."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


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


def fsync_dir(path: Path) -> None:
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
        self.writer = writer
        self.versions_dir = root / "versions"
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._index: dict[str, tuple[Signature, Entry]] = {}
        self._index_lock = threading.Lock()
        # Called as listener(version, "promote" | "rollback") after the live pointer moved.
        self.listeners: list[Callable[[str, str], None]] = []
        if writer:
            for leftover in self.versions_dir.glob("*.tmp"):
                shutil.rmtree(leftover)  # a version whose writer crashed never became a version
            for name in self.names():  # a prune killed after marking a version finishes here
                if self._pruned(name):
                    self._delete_files(name)

    # -- reading ----------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Every version, pruned ones included, oldest first."""
        return sorted((p.name for p in self.versions_dir.iterdir() if _NAME.match(p.name)),
                      key=_number)

    def info(self, name: str) -> VersionInfo:
        """A version's whole metadata, read from its file (reports included)."""
        return VersionInfo.model_validate_json((self._directory(name) / METADATA).read_text())

    def entry(self, name: str) -> Entry:
        """A version's `Entry`, from the index (one stat to see whether its file changed)."""
        self._directory(name)
        found = self._indexed(name)
        if found is None:
            raise RegistryError(f"adapter version {name!r} has no {METADATA}")
        return found

    def entries(self) -> list[Entry]:
        """Every version's `Entry`, pruned ones included, oldest first."""
        names = self.names()
        with self._index_lock:  # forget versions gone from the directory (a test's, or by hand)
            for gone in self._index.keys() - set(names):
                del self._index[gone]
        return [entry for name in names if (entry := self._indexed(name)) is not None]

    def _indexed(self, name: str) -> Entry | None:
        path = self.versions_dir / name / METADATA
        signature = file_signature(path)  # before reading: a write in between is caught next time
        if signature is None:
            return None
        with self._index_lock:
            cached = self._index.get(name)
        if cached is not None and cached[0] == signature:
            return cached[1]
        entry = Entry.of(VersionInfo.model_validate_json(path.read_text()))
        with self._index_lock:
            self._index[name] = (signature, entry)
        return entry

    def page(self, limit: int, before: str | None = None) -> list[str]:
        """The newest `limit` versions, oldest first: of those created before `before` (a
        RegistryError if unknown), or else with the live version added wherever it is. A history
        only grows, so the API serves it a page at a time."""
        names = self.names()
        if before is not None:
            self._directory(before)
            names = names[:names.index(before)]
        page = names[-limit:]
        live = self.live
        if before is None and live is not None and live not in page:
            page = sorted([live, *page], key=_number)
        return page

    def _directory(self, name: str) -> Path:
        if not _NAME.match(name) or not (self.versions_dir / name).is_dir():
            raise RegistryError(f"unknown adapter version {name!r}")
        return self.versions_dir / name

    def _pruned(self, name: str) -> bool:
        entry = self._indexed(name)
        return entry is not None and entry.pruned_at is not None

    def path(self, name: str) -> Path:
        """Directory of a loadable version; only names the registry made, never a caller's path."""
        directory = self._directory(name)
        # Checked before the weights: a prune killed mid-way leaves files of a version marked pruned.
        if self._pruned(name):
            raise RegistryError(f"version {name} was pruned by the registry's retention (`registry.keep_rejected`, "
                                "`registry.keep_superseded`): only its record is kept, it can no longer be loaded")
        if not (directory / ADAPTER_WEIGHTS).is_file():
            raise RegistryError(f"version {name!r} has no {ADAPTER_WEIGHTS}: only safetensors load")
        return directory

    def exports(self, name: str) -> Path:
        """The folder of a loadable version's GGUF exports (derived from its weights, which never
        change, so an export made once stays valid; deleted with its weights by `prune`)."""
        folder = self.path(name) / EXPORTS
        folder.mkdir(exist_ok=True)
        return folder

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
        fsync_dir(self.versions_dir)
        return info

    def record(self, info: VersionInfo) -> None:
        """Rewrite a version's metadata (its weights never change)."""
        fsync_write(self._directory(info.name) / METADATA, info.model_dump_json(indent=2).encode())

    def _write_pointer(self, live: str, history: list[str], since: float | None) -> None:
        fsync_write(self.root / "live.json", json.dumps({"live": live, "history": history, "since": since}).encode())

    def promote(self, name: str) -> None:
        """Move the live pointer to `name` (atomically)."""
        with self._lock:
            self.path(name)
            pointer = self._pointer()
            if pointer["live"] == name:
                return
            self._write_pointer(name, [*pointer["history"], name], time.time())
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
            self._write_pointer(previous, history[:-1], time.time())
        self._moved(previous, "rollback")
        return previous

    # -- retention --------------------------------------------------------------------------
    def prune(self, keep_rejected: int, keep_superseded: int) -> list[str]:
        """Delete the files of all but the newest `keep_rejected` rejected versions (never
        promoted) and `keep_superseded` superseded ones (not live: once live, or accepted and
        never served); returns the names pruned, oldest first.

        Always kept besides: the live version, the one a rollback returns to, and the first
        version (the untrained adapter, which answers as the base model does). Drafts are not
        versions yet, so never touched. A pruned version leaves the pointer's history first, so
        no rollback can reach it; then its metadata is marked `pruned_at`, which makes it
        unloadable, and only then are its files deleted: a crash at any point leaves either a
        complete version or a marked one, whose leftover files the next start deletes.
        """
        with self._lock:  # the pointer must not move between reading it and trimming its history
            entries = self.entries()
            pointer = self._pointer()
            history: list[str] = pointer["history"]
            protected = {pointer["live"], *history[-2:], *(entry.name for entry in entries[:1])}
            rejected: list[str] = []
            superseded: list[str] = []
            for entry in entries:
                if entry.name not in protected and entry.pruned_at is None:
                    never_live = entry.verdict == "rejected" and not entry.overridden
                    (rejected if never_live else superseded).append(entry.name)
            doomed = sorted([*_all_but_newest(rejected, keep_rejected), *_all_but_newest(superseded, keep_superseded)],
                            key=_number)
            gone = set(doomed)
            # Dropping a version can make its neighbours in the history equal: one entry, or a
            # rollback would "return" to the version already live.
            kept = [name for name, _ in groupby(name for name in history if name not in gone)]
            if kept != history:
                self._write_pointer(pointer["live"], kept, pointer.get("since"))
            for name in doomed:
                self.record(self.info(name).model_copy(update={"pruned_at": time.time()}))
                self._delete_files(name)
        return doomed

    def _delete_files(self, name: str) -> None:
        """Everything of a pruned version but its metadata."""
        for entry in self._directory(name).iterdir():
            if entry.name == METADATA:
                continue
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()


def _all_but_newest(versions: list[str], keep: int) -> list[str]:
    """`versions` (oldest first) without its newest `keep`."""
    return versions[:max(len(versions) - keep, 0)]
