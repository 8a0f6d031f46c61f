"""Kafka → replay buffer ingestion: sustained throughput against the embedding limit, the path
without the embedder, and produce → searchable latency at a fixed rate. Real parts: Tansu
broker, kafka-python, the Ingester (poll loop, bounded queue, batching writer), curation,
MiniLM, SQLite and FAISS.

Workload: the first `--n` BANKING77 training tickets.
1. Baseline, measured in the same run: raw batched MiniLM embedding of the same texts (as the
   buffer embeds them: redacted; the batch size the buffer uses). On a CPU this is the ceiling
   of any ingestion.
2. Throughput: the topic is filled first, then an Ingester drains it into a fresh buffer; the
   rate counts from the first stored write to the last (the consumer-group join and the first
   write are excluded). `--rounds` drains, each between two baselines (the machine is shared:
   the faster of the two is the conservative ceiling); the ratio is the median over the rounds
   of drain rate / ceiling (target >= 0.9).
3. The non-embedding path: the same tickets drained with their embeddings given (the
   baseline's vectors, looked up by text), so everything but the model is timed: Kafka fetch,
   validation, queue, curation, the SQLite transaction and its fsync, the FAISS add, the offset
   commit. The tickets are sent `--copies` times under fresh ids, so a drain lasts long enough
   to time; median of `--repeats` drains (target >= 2,000 tickets/s).
4. Latency: tickets produced at `--rate` per second for `--seconds` while the Ingester runs;
   each ticket's latency is from its send to the moment the buffer returned from storing it
   (from then on `search` finds it). Prints p50/p99.
Writes bench/results/ingest.json.

    nice -n 10 .venv/bin/python bench/ingest.py [--n 2000] [--rate 20] [--seconds 30]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from replay.buffer import ReplayBuffer
from replay.config import ReplaySettings
from replay.curate import redact
from replay.embed import Embedder, SentenceEmbedder
from streams.broker import LocalBroker
from streams.config import KafkaSettings
from streams.datasets import load_tickets
from streams.ingest import Ingester, ensure_topics
from streams.produce import TicketProducer, encode
from streams.records import TicketRecord

RATIO_TARGET = 0.9  # whole path against the raw embedding ceiling
GIVEN_TARGET = 2000.0  # tickets/s of the path without the embedder


class TimedBuffer(ReplayBuffer):
    """The real buffer, noting when each id became searchable (add_many returned)."""

    stored_at: dict[str, float]

    def add_many(self, records: Sequence[TicketRecord]) -> None:
        super().add_many(records)
        now = time.perf_counter()
        for r in records:
            self.stored_at.setdefault(r.id, now)


class GivenEmbeddings:
    """Vectors computed once, outside every timing, looked up by text: the buffer's path with
    the model taken out."""

    def __init__(self, texts: Sequence[str], vectors: np.ndarray) -> None:
        self.dim = vectors.shape[1]
        self._vectors = dict(zip(texts, vectors, strict=True))

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self._vectors[t] for t in texts])


def kafka_settings(bootstrap: str, topic: str) -> KafkaSettings:
    # Short group timeouts: Tansu holds a JoinGroup until the rebalance timeout.
    return KafkaSettings(bootstrap=bootstrap, topic=topic, dlq_topic=f"{topic}.dlq", group_id=f"bench-{topic}",
                         max_poll_interval_ms=5000, session_timeout_ms=5000, poll_timeout_ms=100)


def run_ingester(bootstrap: str, settings: KafkaSettings,
                 buffer: ReplayBuffer) -> tuple[threading.Event, threading.Thread]:
    stop = threading.Event()
    thread = threading.Thread(target=Ingester(bootstrap, settings, buffer).run, args=(stop,), daemon=True)
    thread.start()
    return stop, thread


def wait_until(predicate: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError("timed out")
        time.sleep(0.01)


def drain(bootstrap: str, topic: str, tickets: Sequence[TicketRecord], embedder: Embedder,
          directory: Path, replay: ReplaySettings) -> tuple[float, TimedBuffer]:
    """Fill `topic` with the tickets, then time an Ingester draining it into a fresh buffer:
    tickets/s from the first write's return to the last's (the group join and the first write,
    which no earlier write overlaps, are left out)."""
    settings = kafka_settings(bootstrap, topic)
    ensure_topics(bootstrap, settings)
    producer = TicketProducer(bootstrap, settings.topic)
    producer.send_all(encode(t) for t in tickets)
    producer.close()
    buffer = TimedBuffer(directory / topic, embedder, settings=replay)
    buffer.stored_at = {}
    stop, thread = run_ingester(bootstrap, settings, buffer)
    wait_until(lambda: len(buffer.stored_at) > 0, 60)
    first_at = min(buffer.stored_at.values())
    first_write = sum(1 for v in buffer.stored_at.values() if v == first_at)
    wait_until(lambda: len(buffer.stored_at) >= len(tickets), 600)
    last_at = max(buffer.stored_at.values())
    stop.set()
    thread.join(timeout=30)
    return (len(tickets) - first_write) / (last_at - first_at), buffer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="tickets for the throughput runs")
    parser.add_argument("--rounds", type=int, default=3, help="drains through MiniLM, each between two baselines")
    parser.add_argument("--copies", type=int, default=5, help="times the tickets are sent, embeddings given")
    parser.add_argument("--repeats", type=int, default=3, help="drains with the embeddings given (median)")
    parser.add_argument("--rate", type=float, default=20.0, help="tickets per second for the latency run")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of the latency run")
    parser.add_argument("--out", type=Path, default=Path("bench/results/ingest.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("kafka").setLevel(logging.CRITICAL)

    load_before = os.getloadavg()[0]  # the machine is shared: the figures say under what load
    replay = ReplaySettings()
    tickets = load_tickets("banking77", "train")
    throughput_set = tickets[:args.n]
    latency_set = tickets[args.n:args.n + int(args.rate * args.seconds)]
    embedder = SentenceEmbedder(batch_size=replay.embed_batch_size)
    embedder.encode([t.text for t in tickets[-200:]])  # warm-up, outside every timing
    texts = [redact(t.text)[0] if replay.redact_pii else t.text for t in throughput_set]

    def embedding_rate(worker: bool = True) -> tuple[float, np.ndarray]:
        """Texts per second of one batched encode of the throughput set, and its vectors. On a
        worker thread by default, like the Ingester's writer: measured here, torch on the main
        thread ran about half as fast under load (2 cores, other processes), which would flatter
        the ratio."""
        out: list[np.ndarray] = []
        started = time.perf_counter()
        if worker:
            thread = threading.Thread(target=lambda: out.append(embedder.encode(texts)))
            thread.start()
            thread.join()
        else:
            out.append(embedder.encode(texts))
        return len(texts) / (time.perf_counter() - started), out[0]

    # 1. The ceiling: raw batched embedding of the same texts, around every drain.
    embed_main, _ = embedding_rate(worker=False)
    embed_first, vectors = embedding_rate()
    embed_rates = [embed_first]
    print(f"baseline: MiniLM batched embedding   {embed_first:8.1f} texts/s  ({len(texts)} texts, "
          f"batch {replay.embed_batch_size}, worker thread; main thread: {embed_main:.1f} texts/s)")

    with LocalBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        # 2. Sustained throughput from a filled topic, each drain between two baselines.
        ingest_rates, ratios = [], []
        for i in range(args.rounds):
            rate, buffer = drain(broker.bootstrap, f"bench-throughput-{i}", throughput_set, embedder, Path(tmp),
                                 replay)
            embed_rates.append(embedding_rate()[0])
            ingest_rates.append(rate)
            ratios.append(rate / max(embed_rates[-2:]))
            print(f"Kafka -> buffer sustained            {rate:8.1f} tickets/s  ({len(buffer)} rows stored; "
                  f"baseline after: {embed_rates[-1]:.1f} texts/s; ratio {ratios[-1]:.2f})")
        ratio = statistics.median(ratios)
        print(f"ratio to the embedding ceiling       {ratio:8.2f}   (median of {args.rounds}; target >= "
              f"{RATIO_TARGET}: {'met' if ratio >= RATIO_TARGET else 'MISSED'})")

        # 3. The same drain with the embeddings given: everything but the model.
        given = GivenEmbeddings(texts, vectors)
        copies = [t.model_copy(update={"id": f"{t.id}/{c}"}) for c in range(args.copies) for t in throughput_set]
        given_rates = [drain(broker.bootstrap, f"bench-given-{i}", copies, given, Path(tmp), replay)[0]
                       for i in range(args.repeats)]
        given_rate = statistics.median(given_rates)
        print(f"Kafka -> buffer, embeddings given    {given_rate:8.1f} tickets/s  ({len(copies)} tickets; "
              f"median of {', '.join(f'{r:.0f}' for r in given_rates)}; {1000 / given_rate:.3f} ms a ticket; "
              f"target >= {GIVEN_TARGET:,.0f}: {'met' if given_rate >= GIVEN_TARGET else 'MISSED'})")

        # 4. Produce → searchable latency at a fixed rate.
        settings = kafka_settings(broker.bootstrap, "bench-latency")
        ensure_topics(broker.bootstrap, settings)
        producer = TicketProducer(broker.bootstrap, settings.topic)
        buffer = TimedBuffer(Path(tmp) / "latency", embedder, settings=replay)
        buffer.stored_at = {}
        stop, thread = run_ingester(broker.bootstrap, settings, buffer)
        warm = TicketRecord(id="warm-up", text="is anyone there?")
        producer.send_all([encode(warm)])
        wait_until(lambda: "warm-up" in buffer.stored_at, 60)  # the group has joined
        sent_at: dict[str, float] = {}
        started = time.perf_counter()
        for i, ticket in enumerate(latency_set):
            ahead = started + i / args.rate - time.perf_counter()
            if ahead > 0:
                time.sleep(ahead)
            sent_at[ticket.id] = time.perf_counter()
            producer.send(encode(ticket), ticket.id)
            producer.flush()  # one ticket at a time, as a live stream arrives
        wait_until(lambda: all(i in buffer.stored_at for i in sent_at), 120)
        stop.set()
        thread.join(timeout=30)
        producer.close()
        latencies = np.array([buffer.stored_at[i] - sent_at[i] for i in sent_at]) * 1000
        p50, p99 = float(np.percentile(latencies, 50)), float(np.percentile(latencies, 99))
        print(f"produce -> searchable at {args.rate:g}/s       p50 {p50:7.1f} ms   p99 {p99:7.1f} ms  "
              f"({len(latencies)} tickets)")
        probe = latency_set[len(latency_set) // 2]
        assert buffer.search(probe.text, k=1)[0][0].id == probe.id  # searchable, really

    result = {
        "tickets": len(throughput_set), "embed_texts_per_s_runs": embed_rates,
        "embed_texts_per_s_main_thread": embed_main,
        "ingest_tickets_per_s_runs": ingest_rates, "ratio_runs": ratios,
        "ratio": ratio, "target_ratio": RATIO_TARGET, "ratio_met": ratio >= RATIO_TARGET,
        "given_embeddings_tickets_per_s": given_rate, "given_embeddings_runs": given_rates,
        "given_embeddings_tickets": len(copies),
        "target_given_tickets_per_s": GIVEN_TARGET, "given_met": given_rate >= GIVEN_TARGET,
        "latency_rate_per_s": args.rate, "latency_tickets": len(latencies),
        "latency_p50_ms": p50, "latency_p99_ms": p99,
        "embed_batch_size": replay.embed_batch_size,
        "load_average_1m": [load_before, os.getloadavg()[0]],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
