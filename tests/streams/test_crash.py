"""kill -9 of an ingester process mid-stream, then a restart: every valid produced ticket is in
the buffer exactly once, and the FAISS index matches the rows (real broker, MiniLM, FAISS)."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

from replay.buffer import ReplayBuffer
from replay.embed import SentenceEmbedder
from streams.broker import LocalBroker
from streams.config import KafkaSettings
from streams.datasets import load_tickets
from streams.ingest import ensure_topics
from streams.produce import TicketProducer, encode
from tests.conftest import wait_for

WORKER = Path(__file__).with_name("ingest_worker.py")
ROOT = Path(__file__).parents[2]


def start_worker(bootstrap: str, data_dir: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, str(WORKER), bootstrap, str(data_dir)], cwd=ROOT,
                            stdout=log.open("ab"), stderr=subprocess.STDOUT)


def stored(data_dir: Path) -> list[str]:
    """Ids in the buffer, read by a second connection while the worker writes (WAL)."""
    path = data_dir / "buffer.sqlite3"
    if not path.exists():
        return []
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as db:
            return [row[0] for row in db.execute("SELECT id FROM records")]
    except sqlite3.OperationalError:  # the schema is not there yet
        return []


def test_kill_9_mid_stream_then_restart_stores_each_ticket_once(
        broker: LocalBroker, tmp_path: Path, embedder: SentenceEmbedder) -> None:
    settings = KafkaSettings(bootstrap=broker.bootstrap)
    ensure_topics(broker.bootstrap, settings)
    tickets = load_tickets("banking77", "train")[:240]
    values = [encode(t) for t in tickets]
    for i in range(0, len(values), 30):  # bad records in between must not disturb the count
        values.insert(i, b'{"id": "bad", "text": 7}')
    producer = TicketProducer(broker.bootstrap, settings.topic)
    producer.send_all(values)
    producer.close()

    data, log = tmp_path / "buffer", tmp_path / "worker.log"
    worker = start_worker(broker.bootstrap, data, log)
    try:
        wait_for(lambda: len(stored(data)) >= 40, 120, "the worker to store some tickets")
        worker.send_signal(signal.SIGKILL)  # no cleanup: no index save, no final commit
        worker.wait(timeout=10)
        at_kill = len(stored(data))
        assert at_kill < len(tickets), "the stream finished before the kill: make it longer"

        worker = start_worker(broker.bootstrap, data, log)
        wait_for(lambda: len(stored(data)) == len(tickets), 120, "every ticket after the restart")
        worker.send_signal(signal.SIGKILL)  # a second crash, this time at rest
        worker.wait(timeout=10)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    ids = stored(data)
    assert len(ids) == len(set(ids)) == len(tickets), log.read_text()[-3000:]
    assert set(ids) == {t.id for t in tickets}

    reopened = ReplayBuffer(data, embedder)  # the saved index (if any) is stale: rebuilt
    assert reopened.index_matches_rows()
    assert len(reopened) == len(tickets)
    target = tickets[123]
    assert reopened.search(target.text, k=1)[0][0].id == target.id
