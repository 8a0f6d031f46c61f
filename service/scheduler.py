"""APScheduler wiring: thin jobs that call the same `UpdateManager.start` the API calls.

Three triggers, each optional: every `interval_seconds`, on a `cron` schedule, and once the open
window is due (checked every `check_seconds`): it holds `min_new_records`, or its oldest record has
waited `max_wait_seconds`, so a trickle below the volume threshold is never left waiting;
`POST /v1/updates` is the manual one. Jobs live in a SQLite job store, so a schedule survives
restarts: a cron run missed while the service was down runs once at start (within
`misfire_grace_seconds`), and an unchanged job keeps its next run time instead of starting its
interval over. Jobs are stored by reference
(`service.scheduler:run_trigger` and the service's key), never as pickled objects; updates
themselves never overlap, whoever triggers them.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from replay.buffer import ReplayBuffer
from service.settings import SchedulerSettings
from service.update_manager import UpdateInProgress, UpdateManager

LOG = logging.getLogger(__name__)

Trigger = Literal["interval", "cron", "records"]
JOB_IDS: dict[Trigger, str] = {"interval": "update-interval", "cron": "update-cron", "records": "update-if-due"}


@dataclass(frozen=True)
class _Target:
    buffer: ReplayBuffer
    updates: UpdateManager
    settings: SchedulerSettings


# Stored jobs name their service by key (its job-store path), so they survive pickling.
_TARGETS: dict[str, _Target] = {}
_TARGETS_LOCK = threading.Lock()


def due(buffer: ReplayBuffer, settings: SchedulerSettings, now: float | None = None) -> str | None:
    """Why the open window should be learned now (`records` or `max wait`), or None."""
    pending = buffer.pending()
    if pending >= settings.min_new_records:
        return "records"
    since = buffer.pending_since()
    if settings.max_wait_seconds is not None and since is not None and \
            (now or time.time()) - since >= settings.max_wait_seconds:
        return "max wait"
    return None


def update_if_due(buffer: ReplayBuffer, updates: UpdateManager, settings: SchedulerSettings) -> None:
    """Start an update when the open window is due (see `due`) and none is running."""
    if updates.busy:
        return
    reason = due(buffer, settings)
    if reason is not None:
        _start(updates, reason)
    elif buffer.pending():
        updates.warm()  # an update will come: its training process imported by then


def _start(updates: UpdateManager, trigger: str) -> None:
    try:
        record = updates.start(trigger)
        LOG.info("scheduler (%s) started update %d", trigger, record.id)
    except UpdateInProgress:
        pass  # another trigger got there first


def run_trigger(key: str, kind: Trigger) -> None:
    """The job every trigger runs; `records` checks the threshold, the others always start one
    (an update with nothing new to learn is recorded as skipped)."""
    with _TARGETS_LOCK:
        target = _TARGETS.get(key)
    if target is None:
        LOG.warning("scheduled %s job for %s, which is not running here", kind, key)
        return
    if kind == "records":
        update_if_due(target.buffer, target.updates, target.settings)
    elif not target.updates.busy:
        _start(target.updates, kind)


def _triggers(settings: SchedulerSettings) -> dict[Trigger, Any]:
    triggers: dict[Trigger, Any] = {"records": IntervalTrigger(seconds=settings.check_seconds)}
    if settings.interval_seconds:
        triggers["interval"] = IntervalTrigger(seconds=settings.interval_seconds)
    if settings.cron:
        triggers["cron"] = CronTrigger.from_crontab(settings.cron)
    return triggers


def start_scheduler(settings: SchedulerSettings, buffer: ReplayBuffer, updates: UpdateManager,
                    jobstore: Path) -> BackgroundScheduler:
    """Start the scheduler on the SQLite job store at `jobstore`, reconciling its jobs with settings."""
    key = str(jobstore.resolve())
    with _TARGETS_LOCK:
        _TARGETS[key] = _Target(buffer, updates, settings)
    jobstore.parent.mkdir(parents=True, exist_ok=True)
    scheduler = BackgroundScheduler(
        daemon=True, jobstores={"default": SQLAlchemyJobStore(url=f"sqlite:///{jobstore}")},
        job_defaults={"coalesce": True, "max_instances": 1,
                      "misfire_grace_time": int(settings.misfire_grace_seconds)})
    scheduler.start(paused=True)  # the stored jobs are readable, none runs before they are reconciled
    wanted = _triggers(settings)
    for kind, job_id in JOB_IDS.items():
        stored = scheduler.get_job(job_id)
        trigger = wanted.get(kind)
        if trigger is None:
            if stored is not None:
                stored.remove()
        elif stored is None or str(stored.trigger) != str(trigger) or stored.args != (key, kind):
            scheduler.add_job(f"{__name__}:run_trigger", trigger, args=(key, kind), id=job_id,
                              name=f"update ({kind})", replace_existing=True)
        else:
            LOG.info("scheduler keeps stored job %s, next run %s", job_id, stored.next_run_time)
    scheduler.resume()
    return scheduler


def stop_scheduler(scheduler: BackgroundScheduler, jobstore: Path) -> None:
    scheduler.shutdown(wait=False)
    with _TARGETS_LOCK:
        _TARGETS.pop(str(jobstore.resolve()), None)
