"""The `evergreen up` demo: its windows, and the story it tells on the terminal as it runs
(a real broker, the real ingester and buffer, real updates of the tiny llama)."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from pathlib import Path

from service.demo import demo_windows, run_demo
from service.narrator import Narrator
from service.settings import DemoSettings, Settings
from streams.broker import LocalBroker
from streams.ingest import ensure_topics
from tests.conftest import LiveService, tiny_settings, wait_for

SMALL = DemoSettings(windows=3, intents_per_window=2, per_intent=8, scrambled_window=2, rate=200)


def test_windows_bring_new_intents_and_one_is_scrambled() -> None:
    windows = demo_windows(SMALL)
    assert [w.number for w in windows] == [1, 2, 3] and [w.scrambled for w in windows] == [False, True, False]
    intents = [set(w.intents) for w in windows]
    assert all(len(i) == 2 for i in intents) and not (intents[0] & intents[1] or intents[1] & intents[2])
    for w in windows:
        assert len(w.tickets) == 16 and {t.label for t in w.tickets} <= set(w.intents)
    healthy = demo_windows(SMALL.model_copy(update={"scrambled_window": None}))[1]
    # Same tickets, the same labels shuffled among them: nothing left to learn.
    assert [t.id for t in healthy.tickets] == [t.id for t in windows[1].tickets]
    assert sorted(t.label or "" for t in healthy.tickets) == sorted(t.label or "" for t in windows[1].tickets)
    assert sum(a.label != b.label for a, b in zip(healthy.tickets, windows[1].tickets, strict=True)) >= 4


def test_the_demo_tells_each_event_on_one_line(broker: LocalBroker, serve: Callable[[Settings], LiveService],
                                               tmp_path: Path) -> None:
    settings = tiny_settings(tmp_path, broker.bootstrap, demo=SMALL)
    live = serve(settings)
    ensure_topics(broker.bootstrap, settings.kafka)
    lines: list[str] = []
    narrator = Narrator(live.service, lines.append)
    stop = threading.Event()
    demo = threading.Thread(target=run_demo, args=(live.service, broker.bootstrap, settings.kafka.topic, SMALL,
                                                   stop, narrator))
    demo.start()
    try:
        def told_everything() -> bool:
            narrator.tick()
            return sum(" after " in line for line in lines) == 3
        wait_for(told_everything, 300, "three updates told")
    finally:
        stop.set()
        demo.join(30)
    text = "\n".join(lines)
    assert all(re.match(r"\[ *\d+:\d\d\] ", line) for line in lines), text
    for n in (1, 2, 3):
        assert f"demo: streaming window {n}: 16 tickets of 2 new intents" in text, text
        assert f"update {n} started (demo)" in text, text
        assert re.search(rf"update {n} learns window {n}: \d+ tickets, \d+ steps", text), text
        assert re.search(rf"update {n} (PROMOTED|REJECTED) v000{n} after \d+:\d\d: ", text), text
    assert "SCRAMBLED on purpose" in next(line for line in lines if "streaming window 2" in line)
    # Each verdict line carries the gate's reason; a promotion says what went live.
    records = live.service.updates.history
    for record in records:
        assert record.reason is not None and record.reason in text
    for record in (r for r in records if r.status == "promoted"):
        assert f"{record.version} is live" in text
