"""Running updates: snapshot the buffer, train and gate a candidate, register it, promote it.

The API's `POST /v1/updates` and the scheduler both call `UpdateManager.start`; only one update
runs at a time. Training and gating run in a child process (`service.worker_process`) whose progress
lands in `UpdateRecord.progress`; `cancel` stops it. A crash or error anywhere leaves the live
version untouched: the candidate directory is published only when complete, and the pointer
moves only after the gate passes. Every update that registers a version ends by pruning the
registry to its retention (`registry.keep_rejected`, `registry.keep_superseded`).
"""

from __future__ import annotations

import itertools
import logging
import shutil
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from learners.config import GateSettings, TrainSettings
from learners.hpo_config import HpoSettings
from learners.messages import (
    CancelledMessage,
    DoneMessage,
    FailedMessage,
    ProgressMessage,
    StartedMessage,
    WorkerMessage,
)
from learners.placement import CPU, Placement
from learners.privacy import mechanism
from learners.probes import budgeted_probes
from learners.reports import TrainingProgress
from learners.train import Cancelled
from learners.update_step import initial_adapter
from learners.worker import Job
from replay.buffer import ReplayBuffer, Snapshot
from service.buffer_votes import held_out_votes, probe_neighbours
from service.forgetting import AccuracyMatrix, best_before
from service.heap import release_free_memory
from service.live import LiveVersion
from service.privacy import LEDGER_FILE, PrivacyLedger
from service.registry import AdapterRegistry, VersionMetadata
from service.settings import RegistrySettings
from service.update_log import UpdateLog, UpdateRecord
from service.worker_process import TrainingFailed, TrainingProcess, describe_exit, discard, spawn_spare

LOG = logging.getLogger(__name__)
STUDY_JOURNAL = "hpo-study.journal"  # the hyperparameter search's Optuna journal, in `data_dir`
FINISHING_WAIT_S = 10.0  # longest wait for a finished update to tidy up before the next may start


class UpdateInProgress(Exception):
    """Another update is running; updates never overlap."""


class UpdateNotRunning(Exception):
    """The update asked to be cancelled has finished already."""


def ensure_initial_version(registry: AdapterRegistry, base_path: Path, cfg: TrainSettings,
                           placement: Placement = CPU) -> str:
    """The registry's first version (an untrained adapter) when it has none; the live name.

    It is promoted without a runtime to load it into: none can exist before there is a live
    version, and an untrained LoRA adapter answers exactly as the base model does.
    """
    if registry.live is None:
        with registry.draft() as draft:
            initial_adapter(base_path, draft.path, cfg.new_adapter, cfg.seed, placement)
            info = registry.publish(draft, VersionMetadata(parent=None, verdict="accepted", windows_trained=[],
                                                           labels=[]))
        registry.promote(info.name)
    live = registry.live
    assert live is not None
    return live


@dataclass(frozen=True)
class Prepared:
    """An update's inputs, taken before its training process starts."""

    live: str
    windows_trained: list[int]  # by the live version
    snapshot: Snapshot
    shortlists: dict[str, list[str]]
    votes: dict[str, dict[str, float]]


class UpdateManager:
    """Owns the update lifecycle and the history of updates (the newest `retention.keep_updates`,
    kept across restarts: `service.update_log`)."""

    def __init__(self, buffer: ReplayBuffer, live: LiveVersion, matrix: AccuracyMatrix,
                 base_path: Path, train: TrainSettings, gate: GateSettings, scratch_dir: Path,
                 retention: RegistrySettings, hpo: HpoSettings | None = None,
                 study_journal: Path | None = None, placement: Placement = CPU,
                 catch_up: Callable[[], bool] | None = None) -> None:
        self.buffer = buffer
        # Waits until the tickets already sent to the broker are in the buffer; whether they are.
        self.catch_up = catch_up
        self.placement = placement  # of the training process
        # The search before training (`hpo.trials` ≥ 2) and its study's journal; without a journal
        # each update's search is a study of its own trials.
        self.hpo = hpo or HpoSettings()
        self.study_journal = study_journal
        # Job folders of the training processes. A process killed mid-update never removes its
        # own, so what is there at start belongs to no running update: removed.
        self.scratch_dir = scratch_dir
        left = list(scratch_dir.iterdir()) if scratch_dir.exists() else []
        if left:
            LOG.warning("removing %d job folders of updates killed with an earlier run: %s", len(left), scratch_dir)
            shutil.rmtree(scratch_dir)
        self.live = live
        self.registry = live.registry
        self.matrix = matrix
        self.base_path = base_path
        self.train = train
        self.gate = gate
        self.retention = retention
        self._log = UpdateLog(self.registry.root / "updates.jsonl", retention.keep_updates)
        # Private rounds (`train.privacy`) are entered here before they train.
        self.privacy = PrivacyLedger(self.registry.root / LEDGER_FILE, train.privacy, repair=self.registry.writer)
        self.history: list[UpdateRecord] = self._log.load(self.registry)
        self._ids = itertools.count(max((r.id for r in self.history), default=0) + 1)
        self._running = threading.Lock()
        self._thread: threading.Thread | None = None
        # Guards the current update's cancel request and training process, set from API threads.
        self._control = threading.Lock()
        self._cancelled: str | None = None  # why the running update was asked to stop
        self._process: TrainingProcess | None = None
        self._spare: subprocess.Popen[str] | None = None  # the next update's training process, imported
        self._closed = False

    def quarantined(self) -> set[int]:
        """Windows a rejected candidate learned and no live version has learned since: left out
        of later updates, so a bad batch is not trained in with the next good one. Promoting the
        rejected version (an override) accepts them.

        A window whose candidates were rejected only for harm to earlier windows, their own
        windows learned (`GateVerdict.retryable`), or for another window learned beside it (not
        `GateVerdict.at_fault`), is tried again, by up to `gate.retries_after_forgetting` further
        updates."""
        live = self.registry.live
        learned = set(self.registry.entry(live).windows_trained) if live is not None else set()
        tries: Counter[int] = Counter()
        blocked: set[int] = set()
        for entry in self.registry.entries():
            if entry.verdict == "rejected":
                unlearned = set(entry.windows_trained) - learned
                tries.update(unlearned)
                if entry.gate is None or not entry.gate.retryable:  # versions before `at_fault` blamed all
                    blocked |= unlearned & set(entry.gate.at_fault) if entry.gate and entry.gate.at_fault else unlearned
        return blocked | {w for w, n in tries.items() if n > self.gate.retries_after_forgetting}

    @property
    def busy(self) -> bool:
        return self._running.locked()

    @property
    def current(self) -> UpdateRecord | None:
        """The running update, if any."""
        return next((r for r in reversed(self.history) if r.status == "running"), None)

    @property
    def worker_pid(self) -> int | None:
        """Process id of the running update's training process, once started."""
        with self._control:
            return self._process.pid if self._process is not None else None

    def start(self, trigger: str, work: Callable[[UpdateRecord], None] | None = None) -> UpdateRecord:
        """Start an update in the background; raises UpdateInProgress if one is running.

        `work`: what the update does instead of training and gating a candidate of its own (a
        federated round's part, `service.federated_site`), under the same one-at-a-time rule.
        """
        # One whose verdict is out may still be tidying up (its log line, freed memory): a client
        # that saw it finish must be able to start the next, so that wait is not a refusal.
        if not self._running.acquire(blocking=False) and (
                self.current is not None or not self._running.acquire(timeout=FINISHING_WAIT_S)):
            raise UpdateInProgress("an update is already running")
        with self._control:
            self._cancelled, self._process = None, None
        record = UpdateRecord(id=next(self._ids), trigger=trigger)
        self.history.append(record)
        self._thread = threading.Thread(target=self._run, args=(record, work or self._update),
                                        name=f"update-{record.id}", daemon=True)
        self._thread.start()
        return record

    def cancel(self, update_id: int, why: str) -> UpdateRecord:
        """Ask a running update to stop: its training process gets a cancel message, and is
        terminated after `train.cancel_grace_seconds`; its candidate is discarded. Returns at once."""
        record = self.get(update_id)
        if record is None:
            raise KeyError(update_id)
        with self._control:
            if record.status != "running":
                raise UpdateNotRunning(f"update {update_id} has finished: {record.status}")
            self._cancelled = self._cancelled or why
            if self._process is not None:
                self._process.cancel()
        return record

    def cancel_and_wait(self, timeout: float | None = None) -> None:
        """Stop the running update, if any, and wait for it (at shutdown)."""
        record = self.current
        if record is not None:
            try:
                self.cancel(record.id, "the service is stopping")
            except UpdateNotRunning:
                pass
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def spare_pid(self) -> int | None:
        """Process id of the training process waiting for the next update, if any."""
        with self._control:
            return self._spare.pid if self._spare is not None else None

    def warm(self) -> None:
        """Start the next update's training process now (`train.warm_worker`), so that the update
        does not wait for its imports; nothing when one is waiting already. Called once records
        wait to be learned (the scheduler's check), as each update starts and after it, not at
        start-up: a service that never updates never pays for one."""
        with self._control:
            if not self.train.warm_worker or self._closed or (self._spare is not None and self._spare.poll() is None):
                return
            dead, self._spare = self._spare, spawn_spare()
        if dead is not None:
            discard(dead)

    def close(self) -> None:
        """End the waiting training process, if any (at shutdown, after `cancel_and_wait`)."""
        with self._control:
            self._closed = True
            spare, self._spare = self._spare, None
        if spare is not None:
            discard(spare)

    def get(self, update_id: int) -> UpdateRecord | None:
        return next((r for r in self.history if r.id == update_id), None)

    def wait(self, record: UpdateRecord, timeout: float | None = None) -> None:
        """Return once `record`'s update has finished (or `timeout` seconds passed)."""
        thread = self._thread  # the update last started: nothing else starts while a caller waits for its own
        if thread is not None and thread.name == f"update-{record.id}":
            thread.join(timeout)

    def _run(self, record: UpdateRecord, work: Callable[[UpdateRecord], None]) -> None:
        try:
            work(record)
        except Cancelled as exc:
            LOG.info("update %d cancelled: %s", record.id, exc)
            record.status, record.reason = "cancelled", str(exc)
        except Exception as exc:  # the service keeps serving; the failure is reported
            LOG.exception("update %d failed", record.id)
            record.status, record.reason = "failed", f"{type(exc).__name__}: {exc}"
        finally:
            record.finished_at, record.stage = time.time(), "finished"
            del self.history[:-max(self.retention.keep_updates, 1)]
            try:
                self._log.append(record, self.history)
            except OSError:
                LOG.exception("recording update %d in %s failed", record.id, self._log.path)
            release_free_memory()  # the snapshot's and the probes' neighbours' working memory
            self.warm()
            self._running.release()

    def prepare(self, record: UpdateRecord) -> Prepared | None:
        """Close the open window and take the update's snapshot, its probes' neighbours, and its
        privacy budget; None when there is nothing to learn or the budget refuses (the record says)."""
        if self.catch_up is not None:  # `evergreen produce` then `evergreen update` learns what was produced
            record.ingest_caught_up = self.catch_up()
            if not record.ingest_caught_up:
                LOG.warning("update %d: tickets sent to the broker are not all stored yet; learning what is", record.id)
        self.buffer.close_window()
        live = self.registry.live
        if live is None:
            raise RuntimeError(f"the registry at {self.registry.root} has no live version to update")
        live_info = self.registry.info(live)
        started = time.perf_counter()
        snapshot = self.buffer.snapshot(live_info.windows_trained, seed=self.train.seed + record.id,
                                        skip=() if self.gate.retry_rejected_windows else self.quarantined())
        record.windows, record.new_records = list(snapshot.new_windows), len(snapshot.new)
        if not any(r.label for r in snapshot.new):
            record.status, record.reason = "skipped", "no new labelled records since the live version"
            if record.ingest_caught_up is False:
                record.reason += " (the ingester had not stored every ticket sent yet: try again shortly)"
            return None
        if self.train.privacy.enabled:
            planned = mechanism(len(snapshot.new) + len(snapshot.replay), len(snapshot.new), self.train)
            refusal = self.privacy.admit(record.id, planned, stored=len(self.buffer))
            if refusal is not None:
                record.status, record.reason = "skipped", refusal
                return None
        shortlists, votes = probe_neighbours(self.buffer, budgeted_probes(snapshot.probes, snapshot.new_windows,
                                                                          self.gate.probe_budget),
                                             snapshot.labels, self.gate)
        if self.hpo.searching:  # any training row may be held out for validation
            votes |= held_out_votes(self.buffer, [*snapshot.new, *snapshot.replay], snapshot.labels)
        record.snapshot_seconds = time.perf_counter() - started
        return Prepared(live=live, windows_trained=live_info.windows_trained, snapshot=snapshot,
                        shortlists=shortlists, votes=votes)

    def job(self, prepared: Prepared, out_dir: Path, **task: Any) -> Job:
        """The training process's job on `prepared`, writing into `out_dir`; `task`: `Job`'s
        fields as a federated round's part sets them (`task`, `start_dir`, `candidate_dir`, `train`,
        `hpo`), over this manager's."""
        live = prepared.live
        return Job(**{"snapshot": prepared.snapshot, "base_path": self.base_path, "live_dir": self.registry.path(live),
                      "out_dir": out_dir, "train": self.train, "gate": self.gate, "placement": self.placement,
                      "best_before": best_before(self.registry, self.matrix, live),
                      "shortlists": prepared.shortlists, "votes": prepared.votes,
                      "vote_weight": self.buffer.settings.vote_weight, "hpo": self.hpo,
                      "study_journal": self.study_journal, "live_untrained": not prepared.windows_trained, **task})

    def _update(self, record: UpdateRecord) -> None:
        prepared = self.prepare(record)
        if prepared is None:
            return
        live, snapshot = prepared.live, prepared.snapshot
        with self.registry.draft() as draft:
            outcome = self.run_job(record, self.job(prepared, draft.path))
            info = self.registry.publish(draft, VersionMetadata(
                parent=live, verdict="accepted" if outcome.gate.passed else "rejected",
                windows_trained=sorted({*prepared.windows_trained, *snapshot.new_windows}),
                labels=outcome.labels, gate=outcome.gate, train=outcome.train))
        self.matrix.record_gate(info.name, live, outcome.gate)
        record.version, record.gate, record.reason = info.name, outcome.gate, outcome.gate.reason
        record.search = outcome.search
        if info.verdict == "rejected":
            record.status = "rejected"
        else:
            self.live.promote(info.name)
            record.status = "promoted"
        self.prune()

    def prune(self) -> None:
        """Apply the registry's retention. A failure is logged, not the update's: its version is
        registered (and live, if promoted) already, and the next update or start finishes it."""
        try:
            pruned = self.registry.prune(self.retention.keep_rejected, self.retention.keep_superseded)
        except OSError:
            LOG.exception("pruning the registry at %s failed", self.registry.root)
            return
        if pruned:
            LOG.info("pruned %d registry versions (retention): %s", len(pruned), ", ".join(pruned))

    def run_job(self, record: UpdateRecord, job: Job) -> DoneMessage:
        """Run the training process to its end; its `done` message, or an exception saying why not."""
        self.scratch_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="evergreen-update-", dir=self.scratch_dir) as scratch:
            with self._control:
                if self._cancelled is not None:
                    raise Cancelled(self._cancelled)
                spare, self._spare = self._spare, None
                process = self._process = TrainingProcess(job, Path(scratch) / "job.json",
                                                          self.train.cancel_grace_seconds, spare)
            self.warm()  # the next update's, importing while this one trains: updates may come back to back
            last: WorkerMessage | None = None  # the message that ended the run, if any
            try:
                for message in process.messages():
                    if isinstance(message, ProgressMessage):
                        record.progress = TrainingProgress.model_validate(message.model_dump(exclude={"event"}))
                        record.stage = ("searching" if message.trial is not None
                                        else "training" if message.step < message.steps else "gating")
                    elif not isinstance(message, StartedMessage):
                        last = message
            finally:
                code = process.wait()
                with self._control:
                    self._process = None
        if self._cancelled is not None:  # a candidate finished before the child read the request is dropped too
            raise Cancelled(f"{self._cancelled}: {_how_it_stopped(last, code)}")
        if isinstance(last, DoneMessage):
            return last
        reason = last.reason if isinstance(last, FailedMessage | CancelledMessage) else ""
        raise TrainingFailed(reason or describe_exit(code))


def _how_it_stopped(last: WorkerMessage | None, code: int) -> str:
    if isinstance(last, CancelledMessage):
        return last.reason
    if isinstance(last, DoneMessage):
        return "the finished candidate was discarded"
    return describe_exit(code)
