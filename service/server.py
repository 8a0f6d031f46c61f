"""Running an instance: the service, its HTTP server and, for `evergreen up`, a local broker
and the demo producer. Ctrl-C stops everything it started."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator

import uvicorn

from service.app import create_app
from service.core import Service
from service.settings import DemoSettings, Settings
from streams.broker import LocalBroker
from streams.datasets import load_tickets, stream_order
from streams.ingest import ensure_topics
from streams.produce import TicketProducer, encode

LOG = logging.getLogger(__name__)


def run_server(service: Service) -> None:
    """Serve the API until SIGINT/SIGTERM (uvicorn handles both), then stop the service."""
    api = service.settings.api
    server = uvicorn.Server(uvicorn.Config(create_app(service), host=api.host, port=api.port,
                                           log_level="info", access_log=False))
    service.start()
    try:
        server.run()
    finally:
        service.stop()


@contextlib.contextmanager
def broker_for(settings: Settings) -> Iterator[str]:
    """The configured Kafka bootstrap, or a local Tansu broker started for the duration."""
    if settings.kafka.bootstrap:
        yield settings.kafka.bootstrap
        return
    with LocalBroker() as broker:
        yield broker.bootstrap


def demo_producer(bootstrap: str, topic: str, demo: DemoSettings, stop: threading.Event) -> None:
    """Stream BANKING77 in class-incremental order: a few new intents per window."""
    tickets = stream_order(load_tickets("banking77", "train"), order="class-incremental",
                           windows=demo.windows, intents_per_window=demo.intents_per_window,
                           per_intent=demo.per_intent, seed=demo.seed)
    producer = TicketProducer(bootstrap, topic)
    try:
        sent = producer.send_all((encode(t) for t in tickets), rate=demo.rate, stop=stop)
        LOG.info("demo producer sent %d tickets", sent)
    finally:
        producer.close()


def run_up(settings: Settings) -> None:
    """`evergreen up`: broker (local unless configured), service, API, demo stream."""
    with broker_for(settings) as bootstrap:
        service = Service(settings, bootstrap=bootstrap)
        stop = threading.Event()
        if settings.demo.enabled:
            ensure_topics(bootstrap, settings.kafka)
            threading.Thread(target=demo_producer, args=(bootstrap, settings.kafka.topic, settings.demo, stop),
                             name="demo-producer", daemon=True).start()
        try:
            run_server(service)
        finally:
            stop.set()
