"""Soak: one instance under mixed load for `--minutes`, through a broker stop and a kill -9.

`evergreen serve` runs in a process of its own (so the kill is real) on its own settings
(`EVERGREEN_*`: production mode, a generated key, a temporary data directory, a free port)
against the local Tansu broker. Load: tickets at `--rate`/s, `--bad-percent` malformed, produced
to Kafka (`--api-share` of the good ones posted to `/v1/tickets`), each retried until
acknowledged; 4 closed-loop `/v1/classify` clients; 1 streaming chat client; a monitor scraping
`/metrics`, `/readyz`, `/healthz/ingest`, `/v1/updates` and reading /proc; updates by volume.
At a quarter of the run the broker is stopped (SIGSTOP: Tansu keeps topics in memory only, so
a restarted broker would come back empty) for `--broker-stop-s`; half-way the service gets
SIGKILL and restarts on the same data and port (the load runs on at least 10 s after that).
Figures: every good ticket once in the buffer, every bad one dead-lettered with a reason,
failed requests per route outside the restart, p99 per route against the idle p50 measured
first (the baseline), memory and descriptors at start and end (target: growth under 10 %).
Writes bench/results/soak.json and the service's log beside it.

    nice -n 10 .venv/bin/python bench/soak.py [--minutes 30] [--base smollm2-135m] [--rate 1]
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import platform
import random
import re
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from kafka import KafkaConsumer
from kafka.errors import KafkaError

from learners.base_model import SMOLLM2, TINY_LLAMA
from streams.broker import LocalBroker, free_port
from streams.config import KafkaSettings
from streams.datasets import load_tickets
from streams.ingest import ensure_topics
from streams.produce import TicketProducer, encode
from streams.records import TicketRecord

ROOT = Path(__file__).resolve().parents[1]
TOPICS = KafkaSettings()  # the service's default topic names: the soak sets no others
CHAT = "/v1/chat/completions"
BAD_MARKER = re.compile(rb"soak-bad-\d+")
CHAT_PROMPTS = ["My new card still has not arrived, what should I do?", "I was charged twice for one payment.",
                "How do I change my PIN?", "Why was my transfer declined?"]


@dataclass(frozen=True)
class Message:
    id: str  # ticket id, or the marker a bad message carries
    value: bytes
    good: bool
    via_api: bool


def plan(tickets: list[TicketRecord], total: int, bad_percent: float, api_share: float) -> list[Message]:
    """The stream: bad messages evenly spread, of three kinds in turn, each carrying a marker so
    its dead letter can be found; good ones from `tickets` (texts repeat on long runs, ids never)."""
    rng, messages = random.Random(0), list[Message]()
    for i in range(total):
        if int((i + 1) * bad_percent / 100) > int(i * bad_percent / 100):
            marker = f"soak-bad-{i}"
            value = [f"not json {marker}".encode(), json.dumps({"id": marker, "text": 42}).encode(),
                     json.dumps([marker]).encode()][sum(not m.good for m in messages) % 3]
            messages.append(Message(marker, value, False, False))
        else:
            source = tickets[i % len(tickets)]
            record = TicketRecord(id=f"soak-{i}", text=source.text, label=source.label)
            messages.append(Message(record.id, encode(record), True, rng.random() < api_share))
    return messages


def stat(pid: int) -> list[str]:
    """/proc/PID/stat after the command name: state, parent pid, ..."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            found += [int(entry.name)] if entry.name.isdigit() and int(stat(int(entry.name))[1]) == pid else []
        except OSError:
            pass
    return found


def is_alive(pid: int) -> bool:
    """Running and not a zombie (an orphan left to an init that does not reap counts as gone)."""
    try:
        return stat(pid)[0] != "Z"
    except OSError:
        return False


def proc_figures(pid: int) -> dict[str, float]:
    """Resident memory (MB), threads and open file descriptors of a process."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {"rss_mb": int(status["VmRSS"].split()[0]) / 1024, "threads": int(status["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


class ServiceProcess:
    """`evergreen serve` from this checkout in a process of its own, logging to a file."""

    def __init__(self, env: dict[str, str], cwd: Path, url: str) -> None:
        self.env, self.cwd, self.url, self.log = env, cwd, url, cwd / "service.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float) -> None:
        with self.log.open("ab") as log:  # cwd: a folder without evergreen.toml, so only the env counts
            self.proc = subprocess.Popen([sys.executable, "-c", "from service.cli import app; app()", "serve"],
                                         cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"the service was not ready within {timeout} s (exit {self.proc.poll()}):\n{tail}")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self, timeout: float = 120) -> float | None:
        """SIGTERM; the seconds the graceful stop took, None if it had to be killed."""
        if self.proc is None or self.proc.poll() is not None:
            return None
        started = time.monotonic()
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
            return time.monotonic() - started
        except subprocess.TimeoutExpired:
            self.kill9()
            return None


class Soak:
    """What the load threads share: the clock, every request's outcome, samples, events."""

    def __init__(self, service: ServiceProcess, key: str) -> None:
        self.service, self.headers = service, {"Authorization": f"Bearer {key}"}
        self.started = time.monotonic()
        self.lock = threading.Lock()
        self.calls: list[tuple[str, float, float, bool, str]] = []  # route, start, end, ok, why not
        self.samples: list[dict[str, float]] = []
        self.events: dict[str, float] = {}
        # (update id, start time) → (the last instance that listed it, its status): a restarted
        # instance lists the updates of the one before (from the update log), and reuses the id
        # of one that was killed.
        self.updates: dict[tuple[int, float], tuple[int, str]] = {}
        self.instance = 1
        self.stalled_polls = 0
        self.kafka_resends = 0
        self.clients_stop, self.done = threading.Event(), threading.Event()

    def now(self) -> float:
        return time.monotonic() - self.started

    def event(self, name: str) -> float:
        self.events[name] = self.now()
        return self.events[name]

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.service.url, headers=self.headers, timeout=120)

    def record(self, route: str, started: float, ok: bool, why: str = "", ended: float | None = None) -> None:
        with self.lock:
            self.calls.append((route, started, self.now() if ended is None else ended, ok, why))

    def call(self, client: httpx.Client, method: str, route: str, ok: tuple[int, ...] = (200, 202),
             **kwargs: Any) -> httpx.Response | None:
        """One timed request; the response when its status is one of `ok`, else None."""
        started = self.now()
        try:
            response = client.request(method, route, **kwargs)
        except httpx.HTTPError as exc:
            self.record(route, started, False, type(exc).__name__)
            return None
        self.record(route, started, response.status_code in ok, str(response.status_code))
        return response if response.status_code in ok else None

    def sample(self) -> dict[str, float] | None:
        try:
            pid = self.service.pid
            figures = {"t": self.now(), "instance": self.instance, **proc_figures(pid)}
            figures["children_rss_mb"] = sum(proc_figures(c)["rss_mb"] for c in children(pid) if is_alive(c))
        except (OSError, KeyError):  # between the kill and the restart
            return None
        self.samples.append(figures)
        return figures


def classify_client(soak: Soak, texts: list[str], seed: int) -> None:
    rng = random.Random(seed)
    with soak.client() as client:
        while not soak.clients_stop.is_set():
            if soak.call(client, "POST", "/v1/classify", json={"text": rng.choice(texts)}) is None:
                soak.clients_stop.wait(1.0)  # down (the restart): retry, but do not spin


def stream_chat(soak: Soak, client: httpx.Client, prompt: str, max_tokens: int) -> tuple[float | None, bool, str]:
    """One streamed chat answer: when its first chunk came, whether it ended with [DONE], why not."""
    body = {"model": "live", "stream": True, "max_tokens": max_tokens, "temperature": 0.7,
            "messages": [{"role": "user", "content": prompt}]}
    first, finished, why = None, False, ""
    try:
        with client.stream("POST", CHAT, json=body) as response:
            why = str(response.status_code)
            for line in response.iter_lines():
                first = first if first is not None or not line.startswith("data: ") else soak.now()
                finished = finished or line == "data: [DONE]"
        return first, finished, why if finished else f"{why}: the stream ended without [DONE]"
    except httpx.HTTPError as exc:
        return first, False, type(exc).__name__


def chat_client(soak: Soak, max_tokens: int) -> None:
    route, rng = CHAT, random.Random(7)
    with soak.client() as client:
        while not soak.clients_stop.is_set():
            started = soak.now()
            first, finished, why = stream_chat(soak, client, rng.choice(CHAT_PROMPTS), max_tokens)
            soak.record(route, started, finished, why)
            if first is not None:
                soak.record(f"{route} (first chunk)", started, True, ended=first)
            if not finished:
                soak.clients_stop.wait(1.0)


def produce(soak: Soak, bootstrap: str, messages: list[Message], rate: float, via_api: bool) -> None:
    """The messages sent one way (one thread each, so that one path down does not hold up the
    other), each at its time on the stream's steady schedule (late ones go at once: after an
    outage the backlog goes out in a burst), each retried until acknowledged."""
    producer: TicketProducer | None = None
    with soak.client() as http:
        for i, message in enumerate(messages):
            if message.via_api != via_api:
                continue
            if soak.done.wait(max(soak.events["load"] + i / rate - soak.now(), 0)):
                break
            while not soak.done.is_set():
                if message.via_api:
                    if soak.call(http, "POST", "/v1/tickets", json=json.loads(message.value)) is not None:
                        break
                else:
                    try:
                        producer = producer or TicketProducer(bootstrap, TOPICS.topic, max_block_ms=10_000)
                        producer.send_confirmed([message.value], timeout_s=10)
                        break
                    except KafkaError:
                        soak.kafka_resends += 1
                soak.done.wait(1.0)
    if producer is not None:
        producer.close()


def monitor(soak: Soak, every: float) -> None:
    """What a Prometheus scrape and a probe would do, plus /proc readings and the update history."""
    with soak.client() as client:
        while not soak.done.wait(every):
            soak.sample()
            soak.call(client, "GET", "/metrics")
            soak.call(client, "GET", "/readyz")
            health = soak.call(client, "GET", "/healthz/ingest", ok=(200, 503))  # 503 is its answer, not a failure
            soak.stalled_polls += health is not None and health.status_code == 503
            if (updates := soak.call(client, "GET", "/v1/updates")) is not None:
                soak.updates.update({(u["id"], u["started_at"]): (soak.instance, u["status"])
                                     for u in updates.json()})


def idle_baseline(soak: Soak, texts: list[str], labels: list[str], max_tokens: int) -> dict[str, float]:
    """Idle latencies of the same service before the load: classify over the stream's intents
    (the candidates the load's requests get), and whole streamed chat answers; the first of each
    warms up and is left out."""
    classify, chat = [], []
    with soak.client() as client:
        for text in texts[:6]:
            started = soak.now()
            client.post("/v1/classify", json={"text": text, "labels": labels}).raise_for_status()
            classify.append(soak.now() - started)
        for prompt in CHAT_PROMPTS[:3]:
            started = soak.now()
            if not stream_chat(soak, client, prompt, max_tokens)[1]:
                raise RuntimeError("the idle chat baseline failed")
            chat.append(soak.now() - started)
    return {"classify_p50_ms": float(np.median(classify[1:])) * 1e3, "chat_p50_ms": float(np.median(chat[1:])) * 1e3}


def route_figures(soak: Soak) -> dict[str, dict[str, Any]]:
    """Per route: latencies of the answered requests, and failures outside the restart window
    (from the kill to the restarted service's first ready answer: a request overlapping it counts
    there). A `/v1/tickets` 503 while the broker was stopped is the documented answer (resend)."""
    kill, ready = soak.events["kill"], soak.events["ready_again"]
    stopped = (soak.events["broker_stop"], soak.events["broker_resume"] + TOPICS.produce_timeout_ms / 1000)
    figures = {}
    for route in sorted({c[0] for c in soak.calls}):
        calls = [c for c in soak.calls if c[0] == route]
        latencies = np.array([end - start for _, start, end, ok, _ in calls if ok]) * 1e3
        restart = [c for c in calls if not c[3] and c[1] <= ready and c[2] >= kill]
        refused = [c for c in calls if not c[3] and c not in restart and c[4] == "503"
                   and c[1] <= stopped[1] and c[2] >= stopped[0]]
        failed = [c for c in calls if not c[3] and c not in restart and c not in refused]
        figures[route] = {
            "requests": len(calls), "answered": len(latencies), "failed": len(failed),
            "failed_during_restart": len(restart), "refused_broker_stopped": len(refused),
            "failures": dict(Counter(c[4] for c in failed)),
            **{f"p{q}_ms": float(np.percentile(latencies, q)) if len(latencies) else None for q in (50, 99)},
            "max_ms": float(latencies.max()) if len(latencies) else None}
    return figures


def stored_ids(buffer_db: Path) -> Counter[str]:
    with sqlite3.connect(f"file:{buffer_db}?mode=ro", uri=True) as db:
        return Counter({row[0]: row[1] for row in db.execute("SELECT id, COUNT(*) FROM records GROUP BY id")})


def dead_letters(bootstrap: str) -> dict[str, list[str]]:
    """Each bad message's marker → the reasons of the letters that carry it (one per letter)."""
    consumer = KafkaConsumer(TOPICS.dlq_topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             consumer_timeout_ms=5000)
    found: dict[str, list[str]] = {}
    try:
        for message in consumer:
            letter = json.loads(message.value)
            if marker := BAD_MARKER.search(base64.b64decode(letter["value_b64"])):
                found.setdefault(marker.group().decode(), []).append(letter.get("reason") or "")
    finally:
        consumer.close()
    return found


def service_env(args: argparse.Namespace, tmp: Path, bootstrap: str, port: int, key: str,
                every: int) -> dict[str, str]:
    """The service's own settings, as an operator sets them: `EVERGREEN_*` variables only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVERGREEN_")}
    env.update({"PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])]),
                "EVERGREEN_ENVIRONMENT": "production", "EVERGREEN_DATA_DIR": str(tmp / "data"),
                "EVERGREEN_KAFKA_BOOTSTRAP": bootstrap, "EVERGREEN_MODEL_BASE": args.base,
                "EVERGREEN_API_PORT": str(port),
                "EVERGREEN_API_KEYS": json.dumps([{"key": key, "scopes": ["query", "ingest", "admin"]}]),
                "EVERGREEN_SCHEDULER_MIN_NEW_RECORDS": str(every), "EVERGREEN_SCHEDULER_CHECK_SECONDS": "2"})
    if Path(args.base).name == TINY_LLAMA:  # its general-text distillation costs more than the rest of a step
        env["EVERGREEN_TRAIN_KEEP_GENERAL"] = "0"
    env.update(item.split("=", 1) for item in args.env)
    return env


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    train = load_tickets("banking77", "train")
    intents = sorted({t.label for t in train if t.label})[:args.intents]
    pool = [t for t in train if t.label in intents]
    random.Random(0).shuffle(pool)
    texts = [t.text for t in load_tickets("banking77", "test") if t.label in intents]
    duration = args.minutes * 60
    messages = plan(pool, round(args.rate * duration), args.bad_percent, args.api_share)
    good, bad = [m.id for m in messages if m.good], [m.id for m in messages if not m.good]
    every = args.update_every or max(round(len(good) / 6), 10)  # about six updates by volume
    with LocalBroker() as broker:
        ensure_topics(broker.bootstrap, TOPICS)
        port, key = free_port(), "soak-" + secrets.token_urlsafe(24)
        service = ServiceProcess(service_env(args, tmp, broker.bootstrap, port, key, every), tmp,
                                 f"http://127.0.0.1:{port}")
        soak = Soak(service, key)
        threads: list[threading.Thread] = []
        workers: list[int] = []  # training processes of the first instance, at the kill

        def at(offset: float) -> None:  # sleep until `offset` seconds into the load
            time.sleep(max(soak.events["load"] + offset - soak.now(), 0))

        try:
            service.start(args.start_timeout)
            soak.event("ready")
            baseline = idle_baseline(soak, texts, intents, args.chat_tokens)
            idle = soak.sample()
            soak.event("load")
            threads = [threading.Thread(target=produce, args=(soak, broker.bootstrap, messages, args.rate, via_api))
                       for via_api in (False, True)] + [threading.Thread(target=monitor, args=(soak, args.sample_s))]
            for thread in threads:
                thread.start()
            with soak.client() as http:  # classify answers among the buffer's labels until a version learned some
                while not http.get("/v1/buffer").json()["labels"]:
                    time.sleep(0.5)
            clients = [threading.Thread(target=classify_client, args=(soak, texts, seed)) for seed in range(4)]
            clients.append(threading.Thread(target=chat_client, args=(soak, args.chat_tokens)))
            for thread in clients:
                thread.start()
            threads += clients
            soak.event("clients")

            at(duration / 4)
            os.kill(broker.pid, signal.SIGSTOP)
            soak.event("broker_stop")
            time.sleep(args.broker_stop_s)
            os.kill(broker.pid, signal.SIGCONT)
            soak.event("broker_resume")

            at(duration / 2)
            before_kill, workers = soak.sample(), children(service.pid)
            soak.event("kill")  # before the signal: requests it cuts short end after this
            service.kill9()
            soak.instance += 1
            service.start(args.start_timeout)
            soak.event("ready_again")
            orphans = [pid for pid in workers if is_alive(pid)]  # a worker exits when its stdin closes

            at(max(duration, soak.events["ready_again"] - soak.events["load"] + 10))
            soak.clients_stop.set()
            for thread in clients:
                thread.join()
            soak.event("load_end")
            for thread in threads[:2]:  # the producers may still be catching up after the outages
                thread.join(args.drain_s)
            drain_until = soak.now() + args.drain_s
            with soak.client() as http:  # the buffer holds only this run's tickets
                while http.get("/v1/buffer").json()["records"] < len(good) and soak.now() < drain_until:
                    time.sleep(1)
            soak.event("drained")
            end = soak.sample()
        finally:
            soak.clients_stop.set()
            soak.done.set()
            for thread in threads:
                thread.join()
            spawned = set(workers) | set(children(service.pid) if service.proc else [])
            graceful_stop_s = service.stop()
            for pid in filter(is_alive, spawned):  # nothing the run started may outlive it
                os.kill(pid, signal.SIGKILL)
        stored = stored_ids(tmp / "data" / "buffer" / "buffer.sqlite3")
        letters = dead_letters(broker.bootstrap)

    # Memory from the first sample once the load has run a tenth of the run (first requests,
    # thread pools and caches allocate once), to the end; the idle figure is kept beside it.
    assert idle is not None and end is not None
    start = next((s for s in soak.samples if s["t"] >= soak.events["clients"] + duration / 10), idle)
    log = service.log.read_text(errors="replace").splitlines()
    return {
        "args": vars(args), "machine": platform.processor() or platform.machine(), "load_average": os.getloadavg(),
        "tickets": {"good": len(good), "bad": len(bad), "via_api": sum(m.via_api for m in messages),
                    "stored": sum(stored[i] > 0 for i in good), "lost": sum(stored[i] == 0 for i in good),
                    "duplicated": sum(stored[i] > 1 for i in good), "unexpected": len(set(stored) - set(good)),
                    "kafka_resends": soak.kafka_resends, "bad_dead_lettered": sum(b in letters for b in bad),
                    "bad_without_reason": sum(b in letters and not all(letters[b]) for b in bad),
                    "dead_letter_reasons": dict(Counter(letters[b][0] for b in bad if b in letters)),
                    "dead_letters_repeated": sum(len(letters.get(b, [])) > 1 for b in bad)},
        "routes": route_figures(soak), "baseline": baseline,
        "restart": {"first_ready_s": soak.events["ready"],
                    "ready_after_kill_s": soak.events["ready_again"] - soak.events["kill"],
                    "training_processes_at_kill": len(workers), "orphans": len(orphans),
                    "classify_answered_after": sum(c[0] == "/v1/classify" and c[3] and c[1] > soak.events["ready_again"]
                                                   for c in soak.calls)},
        "broker_stop": {"seconds": args.broker_stop_s, "ingest_stalled_polls": soak.stalled_polls},
        "memory": {"idle": idle, "start": start, "before_kill": before_kill, "end": end,
                   "growth": end["rss_mb"] / start["rss_mb"] - 1,
                   "first_instance_growth": (before_kill or start)["rss_mb"] / start["rss_mb"] - 1,
                   "max_rss_mb": max(s["rss_mb"] for s in soak.samples),
                   "max_fds": max(s["fds"] for s in soak.samples)},
        # An update still running when its instance was killed, or when the run ended (the graceful stop cancels it).
        "updates": dict(Counter(status if status != "running" else "killed" if instance < soak.instance
                                else "running at the end" for instance, status in soak.updates.values())),
        "update_every_records": every, "graceful_stop_s": graceful_stop_s, "events": soak.events,
        "samples": soak.samples,
        "service_log_errors": [line for line in log if " ERROR " in line or "Traceback" in line][:20],
    }


def report(doc: dict[str, Any]) -> None:
    t, m, r, b = doc["tickets"], doc["memory"], doc["restart"], doc["baseline"]
    failed = sum(f["failed"] for f in doc["routes"].values())
    rows = [("good tickets lost", f"{t['lost']} of {t['good']}", t["lost"] == 0),
            ("good tickets duplicated", f"{t['duplicated']} ({t['unexpected']} unexpected ids)",
             t["duplicated"] == t["unexpected"] == 0),
            ("bad tickets dead-lettered with a reason", f"{t['bad_dead_lettered'] - t['bad_without_reason']} of "
             f"{t['bad']} {t['dead_letter_reasons']}", t["bad_dead_lettered"] - t["bad_without_reason"] == t["bad"]),
            ("failed requests outside the restart", str(failed), failed == 0),
            ("kill -9 → ready again", f"{r['ready_after_kill_s']:.1f} s, {r['orphans']} orphaned of "
             f"{r['training_processes_at_kill']} training processes", r["orphans"] == 0),
            ("classify answered after the restart", str(r["classify_answered_after"]),
             r["classify_answered_after"] > 0),
            ("resident memory start → kill, → end", f"{m['start']['rss_mb']:.0f} → {m['before_kill']['rss_mb']:.0f}"
             f" ({m['first_instance_growth']:+.1%}), → {m['end']['rss_mb']:.0f} MB ({m['growth']:+.1%}); idle "
             f"{m['idle']['rss_mb']:.0f}, max {m['max_rss_mb']:.0f}",
             max(m["growth"], m["first_instance_growth"]) < 0.1),
            ("open file descriptors start → end", f"{m['start']['fds']:.0f} → {m['end']['fds']:.0f} "
             f"(max {m['max_fds']:.0f})", True),
            ("updates by outcome", str(doc["updates"]), True),
            ("broker stopped: ingestion reported stalled", f"{doc['broker_stop']['ingest_stalled_polls']} polls",
             True)]
    print(f"soak: {doc['args']['minutes']} min on {doc['args']['base']}, {t['good'] + t['bad']} tickets "
          f"({t['via_api']} through the API), load average {doc['load_average'][0]:.1f} at the end")
    for name, figure, ok in rows:
        print(f"  {name:40s} {figure:60s} {'ok' if ok else 'MISSED'}")
    idle = {"/v1/classify": b["classify_p50_ms"], "/v1/chat/completions": b["chat_p50_ms"]}
    for route, f in doc["routes"].items():
        ratio = f" = {f['p99_ms'] / idle[route]:5.1f} × idle p50" if route in idle and f["p99_ms"] else ""
        p99 = f"{f['p99_ms']:8.0f} ms" if f["p99_ms"] is not None else "       -   "
        print(f"  p99 {route:38s} {p99}{ratio:20s}  {f['answered']:5d} answered, {f['failed']} failed, "
              f"{f['failed_during_restart']} in the restart, {f['refused_broker_stopped']} refused (broker stopped)")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0, help="length of the load")
    parser.add_argument("--base", default=SMOLLM2, help=f"base model ({SMOLLM2}, {TINY_LLAMA} or a directory)")
    parser.add_argument("--rate", type=float, default=1.0, help="tickets per second")
    parser.add_argument("--bad-percent", type=float, default=1.0, help="share of malformed tickets")
    parser.add_argument("--api-share", type=float, default=0.1, help="share of good tickets sent to POST /v1/tickets")
    parser.add_argument("--intents", type=int, default=8, help="BANKING77 intents in the stream")
    parser.add_argument("--update-every", type=int, default=None, help="scheduler.min_new_records (default: "
                        "a sixth of the good tickets)")
    parser.add_argument("--broker-stop-s", type=float, default=20.0)
    parser.add_argument("--chat-tokens", type=int, default=32)
    parser.add_argument("--sample-s", type=float, default=5.0, help="seconds between monitor rounds")
    parser.add_argument("--start-timeout", type=float, default=300.0)
    parser.add_argument("--drain-s", type=float, default=300.0)
    parser.add_argument("--env", action="append", default=[], metavar="EVERGREEN_NAME=VALUE",
                        help="a service setting for this run, repeatable (e.g. EVERGREEN_SERVING_CACHED_VERSIONS=0)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "soak.json")
    args = parser.parse_args(argv)
    if bad := [item for item in args.env if not item.startswith("EVERGREEN_") or "=" not in item]:
        parser.error(f"--env takes EVERGREEN_NAME=VALUE, not {', '.join(bad)}")
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("kafka").setLevel(logging.CRITICAL)  # the broker stop makes it loud on purpose
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="evergreen-soak-") as tmp:
        try:
            doc = run(args, Path(tmp))
        finally:  # the service's own log, both instances, beside the figures
            if (log := Path(tmp) / "service.log").exists():
                shutil.copy(log, args.out.with_suffix(".log"))
    report(doc)
    args.out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")
    return doc


if __name__ == "__main__":
    main()
