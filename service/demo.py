"""The demo that `evergreen up` streams: BANKING77 in windows of new intents, one of them broken
on purpose, so a first-time user watches the loop learn, the gate refuse, and the loop learn on.

Each window is produced to Kafka like any ticket; once the buffer holds it, and no update is
running, the demo starts the update that learns it (trigger `demo`), so windows never blur into
each other whatever the CPU's speed. The next window streams while that update trains.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from service.core import Service
from service.narrator import Narrator
from service.settings import DemoSettings
from service.update_manager import UpdateInProgress
from streams.datasets import load_tickets, scramble, stream_order
from streams.produce import TicketProducer, encode
from streams.records import TicketRecord


@dataclass(frozen=True)
class DemoWindow:
    number: int
    tickets: list[TicketRecord]
    intents: tuple[str, ...]
    scrambled: bool  # labels shuffled across its tickets: the gate must refuse it


def demo_windows(demo: DemoSettings) -> list[DemoWindow]:
    """The demo's windows, in order: new intents each, `scrambled_window` broken on purpose."""
    stream = list(stream_order(load_tickets("banking77", "train"), order="class-incremental",
                               windows=demo.windows, intents_per_window=demo.intents_per_window,
                               per_intent=demo.per_intent, seed=demo.seed))
    order = list(dict.fromkeys(t.label for t in stream))  # class-incremental: a window's intents are new
    windows = []
    for w in range(demo.windows):
        intents = tuple(label for label in order[w * demo.intents_per_window:(w + 1) * demo.intents_per_window]
                        if label is not None)
        tickets = [t for t in stream if t.label in intents]
        broken = demo.scrambled_window == w + 1
        windows.append(DemoWindow(w + 1, scramble(tickets, demo.seed) if broken else tickets, intents, broken))
    return windows


def run_demo(service: Service, bootstrap: str, topic: str, demo: DemoSettings, stop: threading.Event,
             narrator: Narrator) -> None:
    """Produce each window, wait until the buffer holds it, start the update that learns it."""
    producer = TicketProducer(bootstrap, topic)
    try:
        for window in demo_windows(demo):
            what = f"{len(window.tickets)} tickets of {len(window.intents)} new intents ({', '.join(window.intents)})"
            narrator.tick()  # what happened before this window is told first
            narrator.tell(f"demo: streaming window {window.number}: {what}"
                 + (", its labels SCRAMBLED on purpose (a broken join): the gate should refuse it"
                    if window.scrambled else ""))
            producer.send_all((encode(t) for t in window.tickets), rate=demo.rate, stop=stop)
            # Stored once the ingester has them; a ticket the curation skips never arrives, so
            # the wait is bounded.
            for _ in range(120):
                if stop.is_set() or service.buffer.pending() >= len(window.tickets):
                    break
                stop.wait(0.5)
            record = None
            while record is None and not stop.is_set():
                try:
                    record = service.updates.start("demo")
                except UpdateInProgress:
                    stop.wait(1.0)
            # The next window may stream once this update has closed the open window.
            while record is not None and not (record.windows or record.finished_at) and not stop.is_set():
                stop.wait(0.2)
            if stop.is_set():
                return
        narrator.tick()
        narrator.tell("demo: every window streamed; the service keeps serving and learns whatever you send it")
    finally:
        producer.close()
