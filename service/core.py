"""One Evergreen instance: the parts of the flow, started and stopped together."""

from __future__ import annotations

import logging
import threading

import torch
from apscheduler.schedulers.background import BackgroundScheduler

from learners.base_model import resolve_base_model
from replay.buffer import ReplayBuffer
from replay.embed import SentenceEmbedder
from service.forgetting import AccuracyMatrix
from service.metrics import make_registry
from service.registry import AdapterRegistry
from service.runtime import ModelRuntime
from service.scheduler import start_scheduler
from service.settings import Settings
from service.updates import UpdateManager
from streams.ingest import Ingester
from streams.produce import TicketProducer

LOG = logging.getLogger(__name__)


class Service:
    """Buffer, registry, serving runtime, updates, ingester and scheduler of one process.

    `bootstrap` overrides `kafka.bootstrap` (for a broker started by `evergreen up`); with
    neither, the service runs without ingestion (tickets can still arrive by other means).
    """

    def __init__(self, settings: Settings, bootstrap: str | None = None) -> None:
        self.settings = settings
        self.bootstrap = bootstrap or settings.kafka.bootstrap
        if settings.model.threads:
            torch.set_num_threads(settings.model.threads)
        data = settings.data_dir
        self.base_path = resolve_base_model(settings.model.base, settings.model.cache_dir)
        embedder = SentenceEmbedder(settings.replay.embedding_model, settings.replay.embed_batch_size)
        self.buffer = ReplayBuffer(data / "buffer", embedder, settings=settings.replay)
        self.registry = AdapterRegistry(data / "registry")
        self.matrix = AccuracyMatrix(data / "registry" / "accuracy.json")
        self.updates = UpdateManager(self.buffer, self.registry, self.matrix, self.base_path,
                                     settings.train, settings.gate)
        self.runtime = ModelRuntime(self.base_path, self.registry, self.updates.ensure_initial_version())
        self.updates.runtime = self.runtime
        self.ingester = (Ingester(self.bootstrap, settings.kafka, self.buffer)
                         if self.bootstrap else None)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._scheduler: BackgroundScheduler | None = None
        self._ticket_producer: TicketProducer | None = None  # made on the first POST /v1/tickets
        self._producer_lock = threading.Lock()
        self.metrics_registry, self.http_metrics = make_registry(self)

    def start(self) -> None:
        if self.ingester is not None:
            thread = threading.Thread(target=self.ingester.run, args=(self._stop,), name="ingest",
                                      daemon=True)
            thread.start()
            self._threads.append(thread)
        if self.settings.scheduler.enabled:
            self._scheduler = start_scheduler(self.settings.scheduler, self.buffer, self.updates)
        LOG.info("service started: serving %s, %d records buffered", self.runtime.version, len(self.buffer))

    def ticket_producer(self) -> TicketProducer:
        """The producer behind `POST /v1/tickets`; raises RuntimeError without a broker."""
        if self.bootstrap is None:
            raise RuntimeError("no Kafka broker configured (`kafka.bootstrap`)")
        with self._producer_lock:
            if self._ticket_producer is None:
                k = self.settings.kafka
                self._ticket_producer = TicketProducer(self.bootstrap, k.topic, max_block_ms=k.produce_timeout_ms,
                                                       max_request_size=k.max_message_bytes * 2 + 4096)
            return self._ticket_producer

    def stop(self) -> None:
        self._stop.set()
        if self._ticket_producer is not None:
            self._ticket_producer.close()
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
        for thread in self._threads:
            thread.join(timeout=10)
        self.updates.cancel_and_wait(timeout=60)
        self.buffer.close()
