"""One Evergreen instance: the parts of the flow, started and stopped together."""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable

import torch
from apscheduler.schedulers.background import BackgroundScheduler
from kafka.errors import KafkaTimeoutError

from learners.base_model import resolve_base_model
from learners.placement import Placement, place
from replay.buffer import ReplayBuffer
from replay.embed import SentenceEmbedder
from service.batching import ClassifyBatcher
from service.export import Exporter, base_gguf
from service.federated_site import FederatedSite
from service.forgetting import AccuracyMatrix
from service.generation import Generator
from service.live import LiveVersion
from service.prometheus import make_registry
from service.registry import AdapterRegistry
from service.replicas import PromotionFollower, PromotionPublisher
from service.runtime import ModelRuntime
from service.scheduler import start_scheduler, stop_scheduler
from service.settings import Settings
from service.update_manager import STUDY_JOURNAL, UpdateManager, ensure_initial_version
from streams.ingest import Ingester
from streams.produce import TicketProducer

LOG = logging.getLogger(__name__)


def placements(settings: Settings) -> tuple[Placement, Placement]:
    """Where the model is served and where updates train; raises PlacementError, naming the
    setting, when this machine lacks the device or the precision (`learners.placement`)."""
    serving = place(settings.model.device, settings.model.precision)
    if settings.train.device is None:
        return serving, serving
    return serving, place(settings.train.device, settings.model.precision, "train.device")


class NoBroker(Exception):
    """The instance runs without Kafka, so it cannot produce tickets."""


class Service:
    """Buffer, registry, serving runtime, updates, ingester and scheduler of one process.

    `bootstrap` overrides `kafka.bootstrap` (for a broker started by `evergreen up`); with
    neither, the service runs without ingestion (tickets can still arrive by other means).
    """

    def __init__(self, settings: Settings, bootstrap: str | None = None) -> None:
        self.settings = settings
        self.bootstrap = bootstrap or settings.kafka.bootstrap
        self.replica = settings.replicas.role == "replica"
        if settings.model.threads:
            torch.set_num_threads(settings.model.threads)
        data = settings.data_dir
        self.placement, self.train_placement = placements(settings)  # before anything loads
        self.base_path = resolve_base_model(settings.model.base, settings.model.cache_dir)
        embedder = SentenceEmbedder(settings.replay.embedding_model, settings.replay.embed_batch_size)
        self.buffer = ReplayBuffer(data / "buffer", embedder, settings=settings.replay)
        self.registry = AdapterRegistry(settings.registry_dir or data / "registry", writer=not self.replica)
        self.matrix = AccuracyMatrix(self.registry.root / "accuracy.json")
        self.runtime = ModelRuntime(self.base_path, self.registry, self._first_version(),
                                    max_cached=settings.serving.cached_versions, placement=self.placement)
        self.live = LiveVersion(self.registry, self.runtime)
        self.exporter = Exporter(self.registry, lambda: self.runtime.base, self.base_path, base_gguf(settings.model))
        # A replica neither ingests nor updates: it only follows the primary's promotions.
        self.ingester = (Ingester(self.bootstrap, settings.kafka, self.buffer)
                         if self.bootstrap and not self.replica else None)
        self.updates = UpdateManager(self.buffer, self.live, self.matrix, self.base_path,
                                     settings.train, settings.gate, scratch_dir=data / "scratch",
                                     retention=settings.registry, hpo=settings.hpo,
                                     study_journal=settings.hpo.journal or data / STUDY_JOURNAL,
                                     placement=self.train_placement, catch_up=self._catch_up())
        self.federated_site = FederatedSite(self.updates, data / "scratch", settings.federation)
        self.generator = Generator(self.runtime, settings.serving.max_prompt_tokens, settings.serving.turn_tokens,
                                   settings.serving.turn_ms)
        self.batcher = ClassifyBatcher(self.runtime, settings.serving.max_batch, settings.serving.batch_wait_ms,
                                       settings.serving.turn_tokens, settings.replay.vote_weight)
        self.publisher = (PromotionPublisher(self.bootstrap, settings.replicas)
                          if self.bootstrap and not self.replica else None)
        if self.publisher is not None:
            self.registry.listeners.append(self.publisher)
        self.follower = (PromotionFollower(self.bootstrap, settings.replicas, self.live, self.matrix)
                         if self.bootstrap and self.replica else None)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.scheduler: BackgroundScheduler | None = None
        self.jobstore = settings.scheduler.jobstore or data / "scheduler.sqlite"
        self._ticket_producer: TicketProducer | None = None  # made on the first POST /v1/tickets
        self._producer_lock = threading.Lock()
        self.metrics_registry, self.http_metrics = make_registry(self)

    def _catch_up(self) -> Callable[[], bool] | None:
        """What an update waits for first: the ingester storing the tickets already sent."""
        timeout = self.settings.kafka.catch_up_timeout_s
        if self.ingester is None or not timeout:
            return None
        return functools.partial(self.ingester.wait_until_stored, timeout)

    def _first_version(self) -> str:
        if not self.replica:
            return ensure_initial_version(self.registry, self.base_path, self.settings.train, self.placement)
        live = self.registry.live
        if live is None:
            raise RuntimeError(f"the registry at {self.registry.root} has no live version yet: "
                               "start the primary first (a replica never writes the registry)")
        return live

    def _spawn(self, name: str, target: Callable[[threading.Event], None]) -> None:
        thread = threading.Thread(target=target, args=(self._stop,), name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def start(self) -> None:
        if self.ingester is not None:
            self._spawn("ingest", self.ingester.run)
        if self.follower is not None:
            self._spawn("follow-promotions", self.follower.run)
        if self.settings.scheduler.enabled and not self.replica:
            self.scheduler = start_scheduler(self.settings.scheduler, self.buffer, self.updates,
                                             self.jobstore)
        LOG.info("service started (%s): serving %s, %d records buffered", self.settings.replicas.role,
                 self.runtime.version, len(self.buffer))

    def ticket_producer(self, deadline: float) -> TicketProducer:
        """The producer behind `POST /v1/tickets`, connected by `deadline` (time.monotonic) or
        KafkaTimeoutError; raises NoBroker without a broker."""
        if self.bootstrap is None:
            raise NoBroker("this instance has no Kafka broker configured (`kafka.bootstrap`): "
                           "it cannot take tickets")
        # Concurrent first requests wait for one connection attempt, each no past its deadline.
        if not self._producer_lock.acquire(timeout=max(deadline - time.monotonic(), 0)):
            raise KafkaTimeoutError("the Kafka producer is still connecting")
        try:
            if self._ticket_producer is None:
                k = self.settings.kafka
                self._ticket_producer = TicketProducer(
                    self.bootstrap, k.topic, max_block_ms=k.produce_timeout_ms,
                    bootstrap_timeout_ms=max(int((deadline - time.monotonic()) * 1000), 1),
                    max_request_size=k.max_message_bytes * 2 + 4096)
            return self._ticket_producer
        finally:
            self._producer_lock.release()

    def stop(self) -> None:
        self._stop.set()
        if self.scheduler is not None:
            stop_scheduler(self.scheduler, self.jobstore)
        if self._ticket_producer is not None:
            self._ticket_producer.close()
        for thread in self._threads:
            thread.join(timeout=10)
        self.updates.cancel_and_wait(timeout=60)
        self.updates.close()
        if self.publisher is not None:
            self.publisher.close()
        self.batcher.close()
        self.buffer.close()
