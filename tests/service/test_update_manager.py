"""Updates train in a child process: the service keeps answering, progress reaches the API, the
metrics and `evergreen update`, and a cancel or a crash of the child leaves the live version and
the registry clean.

Real parts: a uvicorn server, the tiny llama with LoRA, `python -m learners.worker` children.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from learners.config import PROMOTE_ALL, GateSettings
from learners.reports import GateReport
from learners.score_cache import PROBE_SCORES_FILE
from service import update_manager
from service.cli import UPDATE_EXIT, app
from service.core import Service
from service.registry import ADAPTER_WEIGHTS, VersionMetadata
from service.settings import DEV_ADMIN_KEY, RegistrySettings, SchedulerSettings, Settings
from service.update_log import UpdateRecord
from streams.records import TicketRecord
from tests.conftest import TINY_TRAIN, LiveService, add_versions, gauge, is_alive, tiny_settings, wait_for

ROOT = Path(__file__).resolve().parents[2]

# About 110 optimiser steps of the tiny llama: training lasts seconds, long enough to act during it.
TRAIN = TINY_TRAIN.model_copy(update={"threads": 1})
# Tests that cancel: an update that would run for minutes, so it cannot finish before the cancel
# lands on a quiet machine (110 steps took under 3 s there, less than a CLI's reaction to Ctrl-C).
LONG_TRAIN = TRAIN.model_copy(update={"epochs": 3000})
# Tests of the process and the registry, every update promoted (PROMOTE_ALL): what is learned is not the point.
QUICK_TRAIN = TRAIN.model_copy(update={"epochs": 2})
LABELS = ["card_arrival", "exchange_rate"]


def add_window(service: Service, n: int = 40) -> None:
    service.buffer.add_many([TicketRecord(id=f"t{i}", text=f"my {'card' if i % 2 else 'rate'} issue {i}",
                                          label=LABELS[i % 2]) for i in range(n)])


def run_update(service: Service, what: str) -> UpdateRecord:
    """Start an update and wait for it to finish."""
    record = service.updates.start("manual")
    wait_for(lambda: record.finished_at is not None, 180, what)
    return record


def assert_nothing_published(service: Service) -> None:
    assert service.registry.live == "v0000" and service.runtime.version == "v0000"
    assert service.registry.names() == ["v0000"]
    assert not list(service.registry.versions_dir.glob("*.tmp"))


def test_queries_are_answered_while_an_update_trains_in_its_own_process(
        serve: Callable[[Settings], LiveService], tmp_path: Path) -> None:
    # A shortlist of one label, so the gate judges each probe among what its neighbours vote for.
    shortlisting = PROMOTE_ALL.model_copy(update={"shortlist_labels": 1})
    live = serve(tiny_settings(tmp_path, None, train=TRAIN, gate=shortlisting))
    add_window(live.service)
    client = live.client()
    update_id = client.post("/v1/updates", headers=live.admin).json()["id"]
    wait_for(lambda: live.service.updates.worker_pid is not None, 60, "the training process")
    worker = live.service.updates.worker_pid
    assert worker is not None and worker != os.getpid() and is_alive(worker)

    seen: list[dict[str, float]] = []
    answers: list[int] = []
    scraped = ""
    deadline = time.monotonic() + 120
    while (record := client.get(f"/v1/updates/{update_id}").json())["stage"] in ("preparing", "training") \
            and time.monotonic() < deadline:
        if record["stage"] == "training":
            seen.append(record["progress"])
            answers.append(client.post("/v1/classify", json={"text": "my card issue", "labels": LABELS}).status_code)
            if not scraped:
                scraped = client.get("/metrics").text
        time.sleep(0.05)
    wait_for(lambda: client.get(f"/v1/updates/{update_id}").json()["status"] != "running", 120, "the update")
    record = client.get(f"/v1/updates/{update_id}").json()

    assert record["status"] == "promoted" and record["version"] == "v0001", record
    probes = record["gate"]["candidate"]["1"]
    assert probes["n"] > 0 and probes["shortlisted"] == probes["n"] == record["gate"]["live"]["1"]["shortlisted"]
    assert record["snapshot_seconds"] > 0 and record["gate"]["seconds"] > 0
    assert len(answers) >= 5 and set(answers) == {200}, answers  # served all through training
    steps = [p["step"] for p in seen]
    assert steps == sorted(steps) and steps[-1] > steps[0]  # progress arrived as training went
    assert record["progress"]["step"] == record["progress"]["steps"] == seen[0]["steps"]
    assert {"loss", "penalty", "tokens_per_s", "eta_s"} <= set(record["progress"])
    assert record["progress"]["tokens_per_s"] > 0
    assert gauge(scraped, "evergreen_update_running") == 1
    assert gauge(scraped, "evergreen_update_steps") == seen[0]["steps"]
    assert 1 <= (gauge(scraped, "evergreen_update_step") or 0) <= seen[0]["steps"]
    assert (gauge(scraped, "evergreen_update_tokens_per_second") or 0) > 0
    assert gauge(scraped, "evergreen_update_loss") is not None
    after = client.get("/metrics").text
    assert gauge(after, "evergreen_update_running") == 0 and gauge(after, "evergreen_update_step") is None
    assert not is_alive(worker)
    train = live.service.registry.info(record["version"]).train
    assert train is not None and train.threads == 1 and train.steps == record["progress"]["steps"]


def test_cancel_stops_the_training_and_publishes_nothing(serve: Callable[[Settings], LiveService],
                                                        tmp_path: Path) -> None:
    live = serve(tiny_settings(tmp_path, None, train=LONG_TRAIN))
    add_window(live.service)
    client = live.client()
    update_id = client.post("/v1/updates", headers=live.admin).json()["id"]
    wait_for(lambda: client.get(f"/v1/updates/{update_id}").json()["stage"] == "training", 90, "training")
    worker = live.service.updates.worker_pid
    assert worker is not None

    assert client.post(f"/v1/updates/{update_id}/cancel").status_code == 401
    asked = time.monotonic()
    cancelled = client.post(f"/v1/updates/{update_id}/cancel", headers=live.admin)
    assert cancelled.status_code == 202 and cancelled.json()["status"] == "running"
    wait_for(lambda: client.get(f"/v1/updates/{update_id}").json()["status"] != "running", 30, "the cancel")
    took = time.monotonic() - asked
    record = client.get(f"/v1/updates/{update_id}").json()

    assert record["status"] == "cancelled", record
    # Stopped at a step boundary, well within the grace period (not terminated).
    assert record["reason"].startswith("cancelled through the API: cancelled at step"), record["reason"]
    assert took < TRAIN.cancel_grace_seconds
    assert not is_alive(worker)
    assert_nothing_published(live.service)
    assert client.post(f"/v1/updates/{update_id}/cancel", headers=live.admin).status_code == 409
    assert client.post("/v1/updates/99/cancel", headers=live.admin).status_code == 404
    assert client.post("/v1/classify", json={"text": "my card", "labels": LABELS}).status_code == 200


def test_the_gate_reuses_the_live_versions_scores_from_when_it_was_the_candidate(tiny_llama: Path,
                                                                                 tmp_path: Path) -> None:
    """Issue 21: each update scored the live version again on probes it was scored on as the candidate."""
    service = Service(tiny_settings(tmp_path, None, train=TRAIN, gate=PROMOTE_ALL))
    try:
        add_window(service)
        first = run_update(service, "the first update")
        assert first.status == "promoted" and first.gate is not None, first
        assert first.gate.live_scores_reused == 0  # the initial version was never a candidate
        assert first.gate.live_scores_computed == first.gate.live[1].n * len(LABELS)
        assert (service.registry.path("v0001") / PROBE_SCORES_FILE).is_file()

        service.buffer.add_many([TicketRecord(id=f"u{i}", text=f"the {'card' if i % 2 else 'rate'} again {i}",
                                              label=LABELS[i % 2]) for i in range(40)])
        second = run_update(service, "the second update")
        assert second.status == "promoted" and second.gate is not None, second
        gate = second.gate
        # Window 1's probes, all of them among both labels, were scored when v0001 was the candidate:
        # only the new window's are scored on the live version.
        assert gate.live_scores_reused == gate.live[1].n * len(LABELS) > 0
        assert gate.live_scores_computed == gate.live[2].n * len(LABELS)
        was, now = first.gate.candidate[1], gate.live[1]
        assert (now.n, now.accuracy) == (was.n, was.accuracy)
        assert abs(now.loss - was.loss) < 1e-5
    finally:
        service.stop()


def test_a_killed_training_process_fails_the_update_and_the_next_starts_clean(tiny_llama: Path,
                                                                              tmp_path: Path) -> None:
    service = Service(tiny_settings(tmp_path, None, train=TRAIN, gate=PROMOTE_ALL))
    try:
        add_window(service)
        crashed = service.updates.start("manual")
        wait_for(lambda: bool(crashed.progress) or crashed.finished_at is not None, 90, "training")
        worker = service.updates.worker_pid
        assert worker is not None, crashed
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: crashed.finished_at is not None, 30, "the update to notice")
        assert crashed.status == "failed"
        assert crashed.reason == "TrainingFailed: the training process was killed by SIGKILL"
        assert_nothing_published(service)

        again = run_update(service, "the update after the crash")
        assert again.status == "promoted", again
        assert again.version == service.registry.live == service.runtime.version == "v0001"
        assert again.gate is not None and 1 in again.gate.candidate
    finally:
        service.stop()


def test_shutdown_terminates_a_training_process_that_does_not_stop(tiny_llama: Path, tmp_path: Path) -> None:
    # Cancelled before its first step (still importing torch), the child cannot act on the
    # message in time: it is terminated when the grace period ends.
    service = Service(tiny_settings(tmp_path, None, train=TRAIN.model_copy(update={"cancel_grace_seconds": 0.5})))
    try:
        add_window(service)
        record = service.updates.start("manual")
        wait_for(lambda: service.updates.worker_pid is not None, 60, "the training process")
        worker = service.updates.worker_pid
        assert worker is not None
        asked = time.monotonic()
        service.updates.cancel_and_wait(30)
        assert record.status == "cancelled" and time.monotonic() - asked < 10
        assert record.reason == "the service is stopping: the training process was killed by SIGTERM"
        assert not is_alive(worker)
        assert_nothing_published(service)
    finally:
        service.stop()


def test_update_shows_progress_and_exits_with_the_verdict(serve: Callable[[Settings], LiveService],
                                                          tmp_path: Path) -> None:
    # No test on a probe set this small reaches significance at 1e-9, so the check that the new
    # window was learned beyond chance fails: the gate must reject the candidate.
    live = serve(tiny_settings(tmp_path, None, train=TRAIN, gate=GateSettings(alpha=1e-9)))
    runner = CliRunner()

    nothing = runner.invoke(app, ["update", "--url", live.url])  # the key defaults to the settings' admin key
    assert nothing.exit_code == 0, nothing.output
    assert nothing.stdout == "update 1 skipped: no new labelled records since the live version\n"

    add_window(live.service)
    assert live.client().post("/v1/updates", headers=live.admin).status_code == 202
    result = runner.invoke(app, ["update", "--url", live.url, "--key", DEV_ADMIN_KEY, "--poll", "0.2"])
    assert "already running: following update 2" in result.stderr
    record = live.service.updates.get(2)
    assert record is not None and record.status == "rejected" and record.gate is not None
    assert result.exit_code == UPDATE_EXIT["rejected"] == 1, result.output
    assert result.stdout == f"update 2 rejected v0001: {record.gate.reason}\n"
    assert record.progress is not None
    steps = record.progress.steps
    assert f"{steps}/{steps}" in result.stderr and "loss 0." in result.stderr and "tok/s" in result.stderr

    wrong = runner.invoke(app, ["update", "--url", live.url, "--key", "nope"])
    assert wrong.exit_code == 2 and "unknown API key" in wrong.stderr


def test_ctrl_c_cancels_the_update(serve: Callable[[Settings], LiveService], tmp_path: Path) -> None:
    live = serve(tiny_settings(tmp_path, None, train=LONG_TRAIN))
    add_window(live.service)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cli = subprocess.Popen([sys.executable, "-c", "from service.cli import app; app()", "update", "--url", live.url],
                           cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (r := live.service.updates.get(1)) is not None and r.stage == "training", 90, "training")
        cli.send_signal(signal.SIGINT)
        out, err = cli.communicate(timeout=60)
    finally:
        cli.kill()
    record = live.service.updates.get(1)
    assert record is not None and record.status == "cancelled", (record, err[-2000:])
    assert cli.returncode == UPDATE_EXIT["cancelled"] == 3, err[-2000:]
    assert out == f"update 1 cancelled: {record.reason}\n"
    assert record.reason is not None and record.reason.startswith("cancelled through the API")
    assert live.service.registry.names() == ["v0000"]


def test_a_rejected_window_is_quarantined_until_its_version_is_promoted(tiny_llama: Path, tmp_path: Path) -> None:
    service = Service(tiny_settings(tmp_path, None))

    def reject(gate: GateReport | None, *windows: int) -> str:
        source = service.registry.path("v0000")
        with service.registry.draft() as draft:
            for name in ("adapter_config.json", ADAPTER_WEIGHTS):
                shutil.copy(source / name, draft.path / name)
            return service.registry.publish(draft, VersionMetadata(parent="v0000", verdict="rejected", gate=gate,
                                                                   windows_trained=list(windows), labels=LABELS)).name

    try:
        for window, labels in ((1, LABELS), (2, ["pin_blocked"])):
            service.buffer.add_many([TicketRecord(id=f"w{window}-{i}", text=f"ticket {i}",
                                                  label=labels[i % len(labels)]) for i in range(20)])
            assert service.buffer.close_window() == window
        rejected = reject(None, 1)
        assert service.updates.quarantined() == {1}
        snapshot = service.buffer.snapshot([], seed=0, skip=service.updates.quarantined())
        assert snapshot.new_windows == (2,) and set(snapshot.probes) == {2}
        assert snapshot.labels == ("pin_blocked",) and {r.label for r in snapshot.new} == {"pin_blocked"}

        service.live.promote(rejected)  # an admin's override accepts the window it learned
        assert service.updates.quarantined() == set()

        # Rejected only for what it did to earlier windows: tried once more, then quarantined.
        forgot = GateReport(passed=False, reason="drop on window 1", new_windows=(2,), thresholds=GateSettings(),
                            candidate={}, live={}, retryable=True)
        reject(forgot, 2)
        assert service.updates.quarantined() == set()
        reject(forgot, 2)
        assert service.updates.quarantined() == {2}

        # Rejected for a window learned beside it: that one is quarantined, this one tried again.
        service.live.promote(reject(None, 1, 2))  # windows 1 and 2 accepted, out of the way
        scrambled = GateReport(passed=False, reason="window 4 learned beyond chance", new_windows=(3, 4),
                               thresholds=GateSettings(), candidate={}, live={}, at_fault=(4,))
        reject(scrambled, 3, 4)
        assert service.updates.quarantined() == {4}
        reject(scrambled.model_copy(update={"at_fault": (3, 4)}), 3)  # its second refusal: quarantined too
        assert service.updates.quarantined() == {3, 4}
    finally:
        service.stop()


KILLED_SERVICE = """
import sys, time
from pathlib import Path
from tests.conftest import TINY_TRAIN, tiny_settings, wait_for
from service.core import Service
from streams.records import TicketRecord
service = Service(tiny_settings(Path(sys.argv[1]), None, train=TINY_TRAIN.model_copy(update={"epochs": 3000})))
service.buffer.add_many([TicketRecord(id=f"t{i}", text=f"my card issue {i}", label="card_arrival") for i in range(20)])
record = service.updates.start("manual")
wait_for(lambda: record.stage == "training" or record.finished_at is not None, 120, "training")
print("training" if record.finished_at is None else f"finished: {record.status} {record.reason}", flush=True)
time.sleep(600)
"""


def job_folders(data_dir: Path) -> list[Path]:
    """Update job folders of this data directory, in the system temp directory or anywhere below it."""
    found = [job.parent for job in Path(tempfile.gettempdir()).glob("evergreen-update-*/job.json")
             if str(data_dir) in job.read_text()]
    return found + [job.parent for job in data_dir.rglob("evergreen-update-*/job.json")]


def test_a_restart_removes_the_job_folders_of_a_killed_service(tiny_llama: Path, tmp_path: Path) -> None:
    """Issue 13: a service killed mid-update left its job folder in the system temp directory."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    killed = subprocess.Popen([sys.executable, "-c", KILLED_SERVICE, str(tmp_path)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert killed.stdout is not None and killed.stdout.readline() == "training\n"
        assert job_folders(tmp_path), "the update runs from a job folder"
    finally:
        killed.kill()
        killed.wait()
    assert job_folders(tmp_path), "a killed service cannot remove its job folder"
    service = Service(tiny_settings(tmp_path, None))
    try:
        assert job_folders(tmp_path) == []
    finally:
        service.stop()
        for folder in job_folders(tmp_path):  # before the fix: do not leave them for the next run
            shutil.rmtree(folder)


def test_an_update_prunes_the_registry_and_a_pruned_version_is_refused_clearly(
        serve: Callable[[Settings], LiveService], tmp_path: Path) -> None:
    live = serve(tiny_settings(tmp_path, None, train=QUICK_TRAIN, gate=PROMOTE_ALL,
                               registry=RegistrySettings(keep_rejected=0, keep_superseded=1)))
    service, client = live.service, live.client()
    add_versions(service.registry, 3, LABELS)  # v0001-v0003: accepted, never served
    add_window(service)
    assert client.post("/v1/updates", headers=live.admin).status_code == 202
    wait_for(lambda: service.updates.history[-1].finished_at is not None, 180, "the update")
    assert service.updates.history[-1].status == "promoted" and service.registry.live == "v0004"

    # Kept: the live version, v0000 (the rollback target and the first), the newest superseded.
    adapters = {a["name"]: a for a in client.get("/v1/adapters").json()["adapters"]}
    assert [n for n, a in adapters.items() if a["pruned_at"] is None] == ["v0000", "v0003", "v0004"]
    assert adapters["v0001"]["labels"] == LABELS  # the record stays
    for action in ("promote", "load"):
        refused = client.post(f"/v1/adapters/v0001/{action}", headers=live.admin)
        assert refused.status_code == 409 and "was pruned" in refused.json()["detail"], refused.text
    assert {v["name"]: v["pruned"] for v in client.get("/v1/forgetting").json()["versions"]}["v0002"]
    models = client.get("/v1/models").json()["data"]
    assert [m["id"] for m in models] == ["live", "v0004", "v0003", "v0000"]
    assert client.get("/v1/models/v0001").status_code == 404
    metrics = client.get("/metrics").text
    assert gauge(metrics, "evergreen_registry_pruned_total") == 2
    assert gauge(metrics, "evergreen_registry_versions_on_disk") == 3
    assert client.post("/v1/rollback", headers=live.admin).json()["name"] == "v0000"


def test_the_newest_updates_are_kept_bounded_across_a_restart(tiny_llama: Path, tmp_path: Path) -> None:
    """A year-long service: the history may neither grow without end nor vanish with a restart."""
    settings = tiny_settings(tmp_path, None, train=QUICK_TRAIN, gate=PROMOTE_ALL,
                             registry=RegistrySettings(keep_updates=3))
    service = Service(settings)
    try:
        for _ in range(5):  # nothing to learn: each is skipped at once
            run_update(service, "a skipped update")
        add_window(service)
        promoted = run_update(service, "the update")
        assert promoted.status == "promoted" and promoted.gate is not None
        assert [r.id for r in service.updates.history] == [4, 5, 6]  # bounded in memory
    finally:
        service.stop()
    lines = (service.registry.root / "updates.jsonl").read_text().splitlines()
    assert 3 <= len(lines) <= 6  # and on disk: rewritten with the newest once twice as long

    again = Service(tiny_settings(tmp_path, None, registry=RegistrySettings(keep_updates=3)))
    try:
        history = again.updates.history
        assert [(r.id, r.status) for r in history] == [(4, "skipped"), (5, "skipped"), (6, "promoted")]
        assert history[-1].version == promoted.version and history[-1].gate == promoted.gate  # from the registry
        assert history[-1].progress == promoted.progress and history[-1].windows == promoted.windows
        assert run_update(again, "an update after the restart").id == 7  # ids go on
    finally:
        again.stop()


def test_the_next_training_process_waits_imported_and_a_dead_one_is_replaced(
        serve: Callable[[Settings], LiveService], tmp_path: Path) -> None:
    live = serve(tiny_settings(tmp_path, None, train=QUICK_TRAIN, gate=PROMOTE_ALL))
    updates = live.service.updates
    assert updates.spare_pid is None  # nothing waits to be learned: no process is kept for it

    def update(prefix: str) -> int | None:
        """Run a promoted update on a fresh window; the process id that trained it."""
        live.service.buffer.add_many([TicketRecord(id=f"{prefix}{i}", text=f"my {'card' if i % 2 else 'rate'} "
                                                   f"{prefix} {i}", label=LABELS[i % 2]) for i in range(40)])
        record = updates.start("manual")
        wait_for(lambda: updates.worker_pid is not None or record.finished_at is not None, 30, "the worker")
        worker = updates.worker_pid
        wait_for(lambda: record.finished_at is not None, 180, "the update")
        assert record.status == "promoted", record
        return worker

    update("a")
    spare = updates.spare_pid
    assert spare is not None and is_alive(spare)  # started after the update, for the next one
    assert update("b") == spare  # the next update took the waiting process
    after = updates.spare_pid
    assert after is not None and after != spare and is_alive(after)

    os.kill(after, signal.SIGKILL)  # a spare that died while it waited is replaced, not used
    wait_for(lambda: not is_alive(after), 10, "the killed spare")
    assert update("c") not in (after, None)

    last = updates.spare_pid
    assert last is not None
    updates.close()  # at shutdown the waiting process ends with the service
    wait_for(lambda: not is_alive(last), 10, "the spare after close")
    assert updates.spare_pid is None


def test_records_waiting_to_be_learned_start_the_training_process_ahead(
        serve: Callable[[Settings], LiveService], tmp_path: Path) -> None:
    live = serve(tiny_settings(tmp_path, None, train=TRAIN, scheduler=SchedulerSettings(
        enabled=True, check_seconds=0.2, min_new_records=1000, max_wait_seconds=None)))
    assert live.service.updates.spare_pid is None
    add_window(live.service, n=4)  # far below the update threshold
    wait_for(lambda: live.service.updates.spare_pid is not None, 10, "the spare training process")
    assert live.service.updates.current is None  # no update started: the process only waits


def test_the_next_update_starts_as_soon_as_the_last_one_is_seen_finished(
        tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An update tidies up (log, freed memory) after its verdict is out; a client that saw the
    verdict and asks for the next update waits for that, and is not told one is running."""
    tidy = update_manager.release_free_memory
    monkeypatch.setattr(update_manager, "release_free_memory", lambda: (time.sleep(1.0), tidy()))
    service = Service(tiny_settings(tmp_path, None, train=TRAIN, gate=PROMOTE_ALL))
    try:
        first = service.updates.start("manual")
        wait_for(lambda: first.finished_at is not None, 60, "the first update")
        assert service.updates.busy  # still tidying up
        second = service.updates.start("manual")
        wait_for(lambda: second.finished_at is not None, 60, "the second update")
        assert (first.status, second.status) == ("skipped", "skipped")
    finally:
        service.stop()
