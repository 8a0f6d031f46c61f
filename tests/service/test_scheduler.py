"""The scheduler's persistent job store, its triggers, and a crash in the middle of an update."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from learners.config import PROMOTE_ALL, TrainSettings
from service.core import Service
from service.scheduler import due
from service.settings import SchedulerSettings
from streams.records import TicketRecord
from tests.conftest import is_alive, tiny_settings, wait_for

ROOT = Path(__file__).resolve().parents[2]


def test_jobs_persist_across_restarts_and_triggers_fire(tiny_llama: Path, tmp_path: Path) -> None:
    schedule = SchedulerSettings(enabled=True, check_seconds=3600, interval_seconds=3600, cron="0 3 * * *")
    first = Service(tiny_settings(tmp_path, None, scheduler=schedule))
    first.start()
    assert first.scheduler is not None
    stored = {job.id: job.next_run_time for job in first.scheduler.get_jobs()}
    assert set(stored) == {"update-if-due", "update-interval", "update-cron"}
    first.stop()
    assert (tmp_path / "scheduler.sqlite").is_file()
    time.sleep(1.1)  # time passes: an interval that started over would now be due later than stored

    # Restarted with the same schedule: the stored jobs keep their next run times (an interval
    # does not start over); a job dropped from the settings is removed; a new one fires.
    again = SchedulerSettings(enabled=True, check_seconds=3600, interval_seconds=3600, cron=None)
    second = Service(tiny_settings(tmp_path, None, scheduler=again))
    second.start()
    try:
        assert second.scheduler is not None
        jobs = {job.id: job.next_run_time for job in second.scheduler.get_jobs()}
        assert jobs == {k: v for k, v in stored.items() if k != "update-cron"}
        second.scheduler.modify_job("update-interval", next_run_time=time_now(second))
        wait_for(lambda: any(u.trigger == "interval" and u.finished_at for u in second.updates.history), 20,
                 "the interval trigger")
        assert [u.status for u in second.updates.history] == ["skipped"]  # nothing to learn yet
    finally:
        second.stop()


def time_now(service: Service) -> object:
    from datetime import datetime

    assert service.scheduler is not None
    return datetime.now(service.scheduler.timezone)


CRASHING_UPDATE = r"""
import sys, time
from pathlib import Path
from tests.conftest import tiny_settings, wait_for
from learners.config import TrainSettings
from service.core import Service
from streams.records import TicketRecord
service = Service(tiny_settings(Path(sys.argv[1]), None, train=TrainSettings(epochs=2, batch_size=8)))
service.buffer.add_many([TicketRecord(id=f"t{i}", text=f"my {'card' if i % 2 else 'rate'} issue {i}",
                                      label="card_arrival" if i % 2 else "exchange_rate") for i in range(30)])
record = service.updates.start("manual")
# Tell the test once training is under way: asked often, since two epochs are soon over.
wait_for(lambda: bool(record.progress) or record.finished_at is not None, 120, "training", every=0.01)
sys.stdout.write(f"training {service.updates.worker_pid}\n" if record.finished_at is None
                 else f"finished: {record.status} {record.reason}\n")
sys.stdout.flush()
time.sleep(600)
"""


def test_crash_mid_update_leaves_live_untouched_and_next_run_clean(tiny_llama: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", CRASHING_UPDATE, str(tmp_path)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    candidate = tmp_path / "registry" / "versions" / "v0001.tmp"
    try:
        assert child.stdout is not None
        said = child.stdout.readline()
        assert said.startswith("training "), said + (child.stderr.read()[-2000:] if child.stderr else "")
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait(30)
    # Its training process sees the service gone (stdin closed) and exits rather than write on.
    wait_for(lambda: not is_alive(int(said.split()[1])), 5, "the orphaned training process to exit")
    assert candidate.is_dir() and not (tmp_path / "registry" / "versions" / "v0001").exists()

    service = Service(tiny_settings(tmp_path, None, train=TrainSettings(epochs=2, batch_size=8), gate=PROMOTE_ALL))
    try:
        assert service.registry.live == "v0000" and service.runtime.version == "v0000"
        assert service.registry.names() == ["v0000"]
        assert not list((tmp_path / "registry" / "versions").glob("*.tmp"))  # the crashed candidate is gone
        assert len(service.buffer) == 30  # the tickets survived; their window waits to be learned
        record = service.updates.start("manual")
        wait_for(lambda: record.finished_at is not None, 180, "the update after the crash")
        assert record.status == "promoted", record  # the crashed candidate's name is free again
        assert record.version == "v0001" and record.gate is not None and 1 in record.gate.candidate
        assert service.registry.live == service.runtime.version == "v0001"
    finally:
        service.stop()


def test_a_trickle_below_the_volume_threshold_is_learned_after_max_wait(tiny_llama: Path, tmp_path: Path) -> None:
    # Three tickets, far below `min_new_records`: only the max-wait trigger can start their update.
    schedule = SchedulerSettings(enabled=True, check_seconds=0.5, min_new_records=1000, max_wait_seconds=3)
    service = Service(tiny_settings(tmp_path, None, scheduler=schedule, gate=PROMOTE_ALL))
    try:
        assert due(service.buffer, schedule) is None  # an empty window is never due
        service.buffer.add_many([TicketRecord(id=f"t{i}", text=f"my card issue {i}", label="card_arrival")
                                 for i in range(3)])
        arrived = service.buffer.pending_since()
        assert arrived is not None and due(service.buffer, schedule, now=arrived + 2.9) is None
        assert due(service.buffer, schedule, now=arrived + 3) == "max wait"
        service.start()
        wait_for(lambda: any(u.finished_at for u in service.updates.history), 120, "the max-wait update")
        first = service.updates.history[0]
        assert first.trigger == "max wait" and time.time() - arrived >= 3
        assert first.status == "promoted", first.reason  # it trained: nothing was skipped
        assert service.buffer.pending() == 0  # the window was closed and learned
    finally:
        service.stop()


def test_volume_trigger_fires_before_max_wait(tiny_llama: Path, tmp_path: Path) -> None:
    schedule = SchedulerSettings(enabled=False, min_new_records=2, max_wait_seconds=3600)
    service = Service(tiny_settings(tmp_path, None, scheduler=schedule))
    try:
        service.buffer.add_many([TicketRecord(id=f"t{i}", text=f"rate {i}", label="exchange_rate")
                                 for i in range(2)])
        assert due(service.buffer, schedule) == "records"
        assert due(service.buffer, schedule.model_copy(update={"min_new_records": 3})) is None
    finally:
        service.stop()
