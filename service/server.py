"""Running an instance: the service, its HTTP server and, for `evergreen up`, a local broker
and the demo producer. Ctrl-C stops everything it started."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

import uvicorn

from service.app import create_app
from service.core import Service
from service.demo import run_demo
from service.narrator import Narrator, Say
from service.settings import Settings
from streams.broker import LocalBroker, announced, claimed
from streams.ingest import ensure_topics


def run_server(service: Service, narrator: Narrator | None = None) -> None:
    """Serve the API until SIGINT/SIGTERM (uvicorn handles both), then stop the service; a
    `narrator` tells the loop's events as they happen."""
    api = service.settings.api
    server = uvicorn.Server(uvicorn.Config(create_app(service), host=api.host, port=api.port,
                                           log_level="info", access_log=False))
    service.start()
    stop = threading.Event()
    if narrator is not None:
        threading.Thread(target=narrator.run, args=(stop,), name="narrator", daemon=True).start()
    try:
        with terminate_unwinds():
            server.run()
    finally:
        stop.set()
        service.stop()


@contextlib.contextmanager
def terminate_unwinds() -> Iterator[None]:
    """SIGTERM (`docker stop`, systemd, `kill`) ends the process as Ctrl-C does: through every `finally`.

    uvicorn answers SIGTERM with its orderly shutdown, then raises the signal again under the
    handler it found; Python's default one ends the process there, before the service is stopped
    and with `up`'s local broker left running (holding port 9092, so the next `up` took another).
    """
    if threading.current_thread() is not threading.main_thread():  # only the main thread gets signals
        yield
        return

    def exit_on_terminate(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)  # the shell's convention for "ended by signal N"

    previous = signal.signal(signal.SIGTERM, exit_on_terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


LOCAL_BROKER_PORT = 9092  # Kafka's own default, so `evergreen produce` finds it as the README says


@contextlib.contextmanager
def broker_for(settings: Settings) -> Iterator[str]:
    """The configured Kafka bootstrap, or a local Tansu broker started for the duration (on
    port 9092 when it is free and no other `evergreen up` here claimed it first, else on any free
    port), announced in the data directory for `evergreen produce`."""
    if settings.kafka.bootstrap:
        yield settings.kafka.bootstrap
        return
    with (claimed(LOCAL_BROKER_PORT) as ours, LocalBroker(LOCAL_BROKER_PORT if ours else None) as broker,
          announced(broker.bootstrap, settings.data_dir)):
        yield broker.bootstrap


def run_up(settings: Settings, say: Say, started: float | None = None) -> None:
    """`evergreen up`: broker (local unless configured), service, API, the demo stream, and the
    loop's events told through `say`, timed from `started` (a `time.monotonic()` reading)."""
    with terminate_unwinds(), broker_for(settings) as bootstrap:
        say(f"Kafka: {bootstrap}" + ("" if settings.kafka.bootstrap else " (a local broker, in memory: "
                                     "`evergreen produce FILE` from this directory sends to it)"))
        service = Service(settings, bootstrap=bootstrap)
        narrator = Narrator(service, say, started)
        stop = threading.Event()
        if settings.demo.enabled:
            ensure_topics(bootstrap, settings.kafka)
            threading.Thread(target=run_demo, args=(service, bootstrap, settings.kafka.topic, settings.demo, stop,
                                                    narrator), name="demo", daemon=True).start()
        try:
            run_server(service, narrator)
        finally:
            stop.set()
