"""`evergreen up`s started at once on one machine each get a broker of their own: one on 9092
(when it is free), the others on other ports, none failing and none sharing another's.

Real parts: Tansu brokers on loopback, reached over TCP.
"""

from __future__ import annotations

import socket
import threading
from contextlib import ExitStack, suppress
from pathlib import Path

from service.server import broker_for
from service.settings import Settings
from streams.broker import announced_broker


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
