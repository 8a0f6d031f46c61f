"""Shared fixtures: a real Tansu broker, the real embedder, the tiny llama, a live HTTP server."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import httpx
import pytest
import torch
import uvicorn
from playwright.sync_api import Browser, ConsoleMessage, Page, expect, sync_playwright
from safetensors.torch import load_file, save_file

from learners.base_model import TINY_LLAMA, resolve_base_model
from learners.config import AdapterSettings, GateSettings, TrainSettings
from learners.reports import GateReport
from learners.update_step import initial_adapter
from replay.embed import SentenceEmbedder
from service.app import create_app
from service.batching import ClassifyBatcher
from service.core import Service
from service.registry import ADAPTER_WEIGHTS, AdapterRegistry, VersionMetadata
from service.runtime import Classification, ModelRuntime
from service.settings import DEV_ADMIN_KEY, ApiSettings, ModelSettings, SchedulerSettings, Settings
from streams.broker import LocalBroker, free_port
from streams.config import KafkaSettings

MODEL_CACHE = ModelSettings().cache_dir
ROOT = Path(__file__).resolve().parents[1]

# Tiny-llama training that learns a keyword-labelled window in seconds (measured: both windows
# of the synthetic stream reach probe accuracy 1.0 with no forgetting). Without the general-text
# distillation: on the tiny model the full-vocabulary logits it needs cost more than the rest of
# a step; tests/learners/test_general.py covers it.
TINY_TRAIN = TrainSettings(learning_rate=3e-3, epochs=30, batch_size=8, keep_general=0.0)
# The benchmarks' smoke runs test their pipeline and figures, not what the tiny model learns: one
# pass over each window (a pass over reply macros costs the tiny model ~0.5 s a step on one thread).
SMOKE_TRAIN_JSON = '{"learning_rate": 3e-3, "epochs": 1, "min_new_epochs": 1, "batch_size": 8}'
# The random tiny model has no general ability to keep, and without distillation its canary loss
# moves by tenths of a nat: the canary is measured on every update, but its bound (sized for
# SmolLM2) is set out of reach; tests/learners/test_gate.py tests the check itself.
TINY_GATE = GateSettings(max_canary_increase=5.0)
CHROMIUM = "/usr/bin/chromium"  # Debian's package; Playwright never downloads a browser here
# Without the background-networking flags Chromium stalls on refused connections (no internet).
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def load_bench(name: str) -> ModuleType:
    """A benchmark script of `bench/` (a folder of scripts, not a package) as a module."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def process_state(pid: int) -> str | None:
    """The process's state letter in /proc (`R`, `S`, `T` stopped, `Z` zombie...); None when gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def is_alive(pid: int) -> bool:
    """Whether a process runs (a zombie left to an init that does not reap counts as gone)."""
    return process_state(pid) not in (None, "Z")


def freeze(pid: int) -> None:
    """SIGSTOP a process and return once the kernel reports it stopped, so a test's premise
    (the broker does not answer) is checked rather than assumed."""
    os.kill(pid, signal.SIGSTOP)
    wait_for(lambda: process_state(pid) == "T", 10, f"process {pid} to stop")


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, every: float = 0.2) -> None:
    """Return once `predicate` holds (asked every `every` seconds); fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def gauge(metrics: str, name: str) -> float | None:
    """A sample's value in a Prometheus text exposition (None when absent)."""
    found = re.search(rf"^{name} (\S+)$", metrics, re.MULTILINE)
    return float(found.group(1)) if found else None


@pytest.fixture(scope="session")
def tiny_llama() -> Path:
    return resolve_base_model(TINY_LLAMA, MODEL_CACHE)


@pytest.fixture(scope="session")
def embedder() -> SentenceEmbedder:
    return SentenceEmbedder()


@pytest.fixture
def broker() -> Iterator[LocalBroker]:
    with LocalBroker() as running:
        yield running


def tiny_settings(data_dir: Path, bootstrap: str | None, **overrides: object) -> Settings:
    values: dict[str, object] = dict(
        data_dir=data_dir,
        kafka=KafkaSettings(bootstrap=bootstrap, max_poll_interval_ms=3000, session_timeout_ms=3000,
                            poll_timeout_ms=200),
        model=ModelSettings(base=TINY_LLAMA, cache_dir=MODEL_CACHE),
        train=TINY_TRAIN,
        gate=TINY_GATE,
        scheduler=SchedulerSettings(enabled=False),
        api=ApiSettings(port=free_port()),
    )
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@dataclass
class LiveService:
    service: Service
    url: str
    admin: dict[str, str]

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60)


@pytest.fixture
def serve(tiny_llama: Path) -> Iterator[Callable[[Settings], LiveService]]:
    """Start a Service behind a real uvicorn server on a free port; everything stops after."""
    started: list[tuple[Service, uvicorn.Server, threading.Thread]] = []

    def start(settings: Settings) -> LiveService:
        service = Service(settings)
        server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1",
                                               port=settings.api.port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        service.start()
        thread.start()
        started.append((service, server, thread))
        wait_for(lambda: server.started, 30, "the HTTP server")
        return LiveService(service, f"http://127.0.0.1:{settings.api.port}",
                           {"Authorization": f"Bearer {DEV_ADMIN_KEY}"})

    yield start
    for service, server, thread in started:
        server.should_exit = True
        thread.join(timeout=10)
        service.stop()


def classify_concurrently(url: str, bodies: list[dict[str, object]], clients: int) -> list[dict[str, object]]:
    """`/v1/classify` answers to `bodies`, sent by `clients` threads at once (body i by thread i % clients)."""
    answers: list[dict[str, object]] = [{} for _ in bodies]

    def ask(worker: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            for i in range(worker, len(bodies), clients):
                answers[i] = http.post("/v1/classify", json=bodies[i]).json()

    threads = [threading.Thread(target=ask, args=(w,)) for w in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return answers


def classify_served(runtime: ModelRuntime, texts: list[str], labels: list[str] | None, top_k: int
                    ) -> list[Classification]:
    """Each text's answer through the serving path: the batcher in front of `runtime`, as `/v1/classify` asks."""
    batcher = ClassifyBatcher(runtime, max_batch=len(texts))
    try:
        return [batcher.classify(text, labels, top_k) for text in texts]
    finally:
        batcher.close()


def add_versions(registry: AdapterRegistry, count: int, labels: list[str],
                 gate: GateReport | None = None, verdict: str = "accepted") -> list[str]:
    """Registry versions with distinct (random, finite) LoRA weights, as an update would write."""
    source = registry.path("v0000")
    names = []
    for i in range(count):
        with registry.draft() as draft:
            shutil.copy(source / "adapter_config.json", draft.path / "adapter_config.json")
            generator = torch.Generator().manual_seed(i)
            weights = {k: torch.randn(v.shape, generator=generator) * 0.05
                       for k, v in load_file(str(source / ADAPTER_WEIGHTS)).items()}
            save_file(weights, str(draft.path / ADAPTER_WEIGHTS))
            metadata = VersionMetadata(parent="v0000", verdict=verdict, windows_trained=[],  # type: ignore[arg-type]
                                       labels=labels, gate=gate)
            names.append(registry.publish(draft, metadata).name)
    return names


def add_version_of(registry: AdapterRegistry, base_path: Path, adapter: AdapterSettings, labels: list[str]) -> str:
    """A registry version holding a fresh untrained adapter of another method (prefix tuning, IA3)."""
    with registry.draft() as draft:
        initial_adapter(base_path, draft.path, adapter, seed=0)
        return registry.publish(draft, VersionMetadata(parent=registry.live, verdict="accepted", windows_trained=[],
                                                       labels=labels)).name


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        yield launched
        launched.close()


def open_console(browser: Browser, url: str, errors: list[str]) -> Page:
    """The web console in a new page, its script's errors collected in `errors`."""
    page = browser.new_page(viewport={"width": 1360, "height": 900})

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            errors.append(message.text)

    page.on("console", on_console)
    page.on("pageerror", lambda exc: errors.append(f"uncaught: {exc}"))
    page.goto(url)
    expect(page.locator('#timeline [data-name="v0000"]')).to_be_visible()
    return page
