"""APScheduler wiring: a thin job that calls the same `UpdateManager.start` the API calls."""

from __future__ import annotations

import logging

from apscheduler.schedulers.background import BackgroundScheduler

from replay.buffer import ReplayBuffer
from service.settings import SchedulerSettings
from service.updates import UpdateInProgress, UpdateManager

LOG = logging.getLogger(__name__)


def update_if_due(buffer: ReplayBuffer, updates: UpdateManager, min_new_records: int) -> None:
    """Start an update when the open window holds enough records and none is running."""
    if updates.busy or buffer.pending() < min_new_records:
        return
    try:
        record = updates.start("scheduler")
        LOG.info("scheduler started update %d", record.id)
    except UpdateInProgress:
        pass  # a manual trigger got there first


def start_scheduler(settings: SchedulerSettings, buffer: ReplayBuffer,
                    updates: UpdateManager) -> BackgroundScheduler:
    scheduler = BackgroundScheduler(daemon=True)
    scheduler.add_job(update_if_due, "interval", seconds=settings.check_seconds,
                      args=(buffer, updates, settings.min_new_records), id="update-if-due",
                      max_instances=1, coalesce=True)
    scheduler.start()
    return scheduler
