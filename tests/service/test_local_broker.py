"""`evergreen up`s started at once on one machine each get a broker of their own: one on 9092
(when it is free), the others on other ports, none failing and none sharing another's.

Real parts: Tansu brokers on loopback, reached over TCP.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from contextlib import ExitStack, suppress
from pathlib import Path

import pytest

from service.server import broker_for
from service.settings import Settings
from streams.broker import announced_broker, free_port
from tests.conftest import ROOT


def test_three_ups_started_at_once_get_three_brokers(tmp_path: Path) -> None:
    sites = [Settings(data_dir=tmp_path / name) for name in ("east", "west", "north")]
    start, done, release = threading.Barrier(len(sites)), threading.Barrier(len(sites) + 1), threading.Event()
    bootstraps: dict[str, str] = {}
    errors: list[BaseException] = []

    def up(settings: Settings) -> None:
        try:
            start.wait()
            with broker_for(settings) as bootstrap:
                bootstraps[settings.data_dir.name] = bootstrap
                done.wait()
                release.wait()
        except BaseException as exc:  # noqa: BLE001 - reported by the test's thread
            errors.append(exc)
            done.abort()

    threads = [threading.Thread(target=up, args=(s,)) for s in sites]
    with ExitStack() as stack:
        stack.callback(lambda: [t.join(30) for t in threads])
        stack.callback(release.set)
        for thread in threads:
            thread.start()
        with suppress(threading.BrokenBarrierError):  # an `up` that failed broke it: its error says why
            done.wait(timeout=60)
        assert not errors, errors
        assert len(set(bootstraps.values())) == len(sites), bootstraps
        for settings in sites:  # each announced to its own data directory, and listening
            bootstrap = bootstraps[settings.data_dir.name]
            assert announced_broker(settings.data_dir) == bootstrap
            host, _, port = bootstrap.rpartition(":")
            socket.create_connection((host, int(port)), timeout=2).close()


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root to act as a second user")
def test_another_users_claim_on_a_shared_machine_is_theirs() -> None:
    # Their lock file in the shared temp folder, which this user may not open for writing.
    port = free_port()
    lock = Path(tempfile.gettempdir()) / f"evergreen-broker-{port}.lock"
    lock.touch()
    lock.chmod(0o644)
    try:
        probe = f"from streams.broker import claimed\nwith claimed({port}) as mine: print(mine)"
        done = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable,
                               "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr[-800:]
    finally:
        lock.unlink()
