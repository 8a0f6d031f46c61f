"""`evergreen up` leaves no local broker behind, however it ends: a broker left holding port 9092
takes the tickets that `evergreen produce` sends there, while the next `up` listens elsewhere.
While it runs, `evergreen produce` in the same data directory finds its broker unaided."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from streams.broker import ANNOUNCEMENT, announced_broker, free_port
from tests.conftest import is_alive, wait_for

EVERGREEN = Path(sys.executable).parent / "evergreen"


def children(pid: int) -> list[int]:
    return [int(child) for task in Path(f"/proc/{pid}/task").iterdir()
            for child in (task / "children").read_text().split()]


def answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


@pytest.mark.parametrize(("stop", "exit_code"), [(signal.SIGTERM, 128 + signal.SIGTERM), (signal.SIGKILL, None)],
                         ids=["SIGTERM", "SIGKILL"])
def test_up_ended_by_a_signal_stops_its_local_broker(stop: signal.Signals, exit_code: int | None,
                                                     tiny_llama: Path, tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "EVERGREEN_DATA_DIR": str(tmp_path), "EVERGREEN_MODEL_BASE": str(tiny_llama),
           "EVERGREEN_DEMO_ENABLED": "false", "EVERGREEN_SCHEDULER_ENABLED": "false", "EVERGREEN_API_PORT": str(port)}
    env.pop("EVERGREEN_KAFKA_BOOTSTRAP", None)
    up = subprocess.Popen([str(EVERGREEN), "up"], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    brokers: list[int] = []
    try:
        def ready() -> bool:
            assert up.poll() is None, up.stderr.read() if up.stderr else up.returncode
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False
        wait_for(ready, 120, "evergreen up to answer")
        brokers = [pid for pid in children(up.pid) if "tansu" in Path(f"/proc/{pid}/cmdline").read_text()]
        assert len(brokers) == 1, children(up.pid)
        broker_port = int(Path(f"/proc/{brokers[0]}/cmdline").read_text().split("tcp://127.0.0.1:")[1].split("\0")[0])
        assert answers(broker_port)
        assert announced_broker(tmp_path) == f"127.0.0.1:{broker_port}"

        if stop == signal.SIGTERM:  # once is enough: `evergreen produce` with no broker configured
            (tmp_path / "t.jsonl").write_text("".join(json.dumps({"id": f"t{i}", "text": f"ticket {i}", "label": "a"})
                                                      + "\n" for i in range(3)))
            produced = subprocess.run([str(EVERGREEN), "produce", "t.jsonl"], env=env, cwd=tmp_path,
                                      capture_output=True, text=True, timeout=120)
            assert produced.returncode == 0 and f"on 127.0.0.1:{broker_port}" in produced.stderr, produced
            wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/v1/buffer").json()["records"] == 3, 60,
                     "the produced tickets in the buffer")

        up.send_signal(stop)
        code = up.wait(60)
        if exit_code is not None:  # an orderly exit, by the shell's convention for a signal
            assert code == exit_code, up.stderr.read() if up.stderr else code
        wait_for(lambda: not is_alive(brokers[0]), 10, "the broker to end with evergreen up")
        assert not answers(broker_port)
        assert announced_broker(tmp_path) is None  # SIGKILL leaves the note, naming a port nobody answers on
        assert (tmp_path / ANNOUNCEMENT).exists() == (stop == signal.SIGKILL)
    finally:
        up.kill()
        up.wait()
        for pid in brokers:
            if is_alive(pid):
                os.kill(pid, signal.SIGKILL)
