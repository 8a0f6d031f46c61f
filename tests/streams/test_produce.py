"""`evergreen produce` against a real broker: data sets and JSONL, both orders, windows, rate."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from service.cli import app
from streams.broker import LocalBroker
from streams.produce import order_lines, source_values
from tests.streams.conftest import read_topic


def labels_of(values: list[bytes]) -> list[str | None]:
    return [json.loads(v).get("label") for v in values]


def test_class_incremental_jsonl_puts_each_label_in_one_window() -> None:
    lines = [json.dumps({"id": str(i), "text": "t", "label": "abcd"[i % 4]}).encode() for i in range(40)]
    ordered = labels_of(order_lines(lines, order="class-incremental", windows=2, seed=3))
    assert set(ordered[:20]) == {"a", "b"} and set(ordered[20:]) == {"c", "d"}
    shuffled = order_lines(lines, order="random", seed=3)
    assert sorted(shuffled) == sorted(lines) and shuffled != lines
    assert order_lines(lines, order="random", seed=3) == shuffled  # seeded


def test_banking77_streams_new_intents_per_window() -> None:
    values = source_values("banking77", order="class-incremental", windows=3, intents_per_window=2, per_intent=5)
    labels = labels_of(values)
    windows = [set(labels[i * 10:(i + 1) * 10]) for i in range(3)]
    assert len(values) == 30 and all(len(w) == 2 for w in windows)
    assert not windows[0] & windows[1] and not windows[1] & windows[2]
    with pytest.raises(ValueError, match="neither a file"):
        source_values("no-such-source")


def test_cli_produces_at_the_given_rate(broker: LocalBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVERGREEN_KAFKA_BOOTSTRAP", broker.bootstrap)
    monkeypatch.setenv("EVERGREEN_CONFIG_FILE", str(tmp_path / "evergreen.toml"))
    (tmp_path / "evergreen.toml").write_text("")
    source = tmp_path / "tickets.jsonl"
    source.write_text("".join(json.dumps({"id": f"j{i}", "text": "hi", "label": "xy"[i % 2]}) + "\n"
                              for i in range(20)) + "not json\n")
    started = time.monotonic()
    result = CliRunner().invoke(app, ["produce", str(source), "--order", "class-incremental", "--windows", "2",
                                      "--rate", "40"])
    assert result.exit_code == 0, result.output
    assert time.monotonic() - started >= 0.4  # 21 values at 40 per second
    values = read_topic(broker.bootstrap, "tickets", 21)
    assert len(values) == 21 and b"not json" in values  # sent as is: the ingester dead-letters it
    bad = CliRunner().invoke(app, ["produce", "banking77", "--order", "sideways"])
    assert bad.exit_code != 0 and "unknown order" in bad.output
