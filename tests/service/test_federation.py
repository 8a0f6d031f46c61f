"""A federation as its operators run it: a Flower hub and sites' clients as processes in `.venv-fed`,
on loopback, each honest site's client bridging to a real Evergreen service on the tiny model.

One round with everything that can go wrong in it: a site whose client is killed mid-fit, a site
with nothing new to learn, a site that sends NaN weights, one whose key the hub does not know. The
round goes on with the two honest sites that trained (the quorum), their adapters averaged, gated
on their pooled probes, and the promoted version delivered by the next round to every site still
connected; the refusals are in the hub's log with their reasons.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from service.federation.launch import federation_python
from service.registry import ADAPTER_WEIGHTS
from service.settings import Settings
from streams.broker import free_port
from streams.records import TicketRecord
from tests.conftest import TINY_GATE, TINY_TRAIN, LiveService, tiny_settings, wait_for

FED_PYTHON = Path(__file__).resolve().parents[2] / ".venv-fed" / "bin" / "python"
pytestmark = pytest.mark.skipif(not FED_PYTHON.exists(), reason="the federation's environment: `make federation`")
QUICK = TINY_TRAIN.model_copy(update={"epochs": 10.0, "threads": 1})
KEYS = {"east": "east-key-0123456789abcdef", "west": "west-key-0123456789abcdef",
        "north": "north-key-0123456789abcdef", "south": "south-key-0123456789abcdef",
        "rogue": "rogue-key-0123456789abcdef"}
# Clients that lie, for the hub to catch: `nan` signs NaN weights with its real key; `unknown`
# signs a plausible adapter with a key the hub was never given.
ROGUE = """
import sys
import numpy as np
import flwr
from service.federation.site_client import SiteClient, wait_for_hub
from service.federation.wire import payload, sign

class Rogue(SiteClient):
    def get_parameters(self, config):  # an adapter of its own choosing, for the hub's first global one
        return [np.zeros(4, dtype=np.float32)]

    def fit(self, parameters, config):
        r = int(config["round"])
        if MODE == "nan":
            parameters = [np.full_like(a, np.nan) for a in parameters]
        return parameters, 50, {"site": self.name, "reason": "", "epsilon_spent": 0.0,
                                "signature": sign(self.key, r, "fit", payload(parameters, 50, 0.0))}

    def evaluate(self, parameters, config):
        raise RuntimeError("a rogue site does not evaluate")

MODE, hub, name, key = sys.argv[1:5]
wait_for_hub(hub, 120)
flwr.client.start_client(server_address=hub, client=Rogue(name, "http://127.0.0.1:9", "x", key).to_client(),
                         insecure=True)
"""


def add_window(live: LiveService, tag: str, labels: tuple[str, ...]) -> None:
    live.service.buffer.add_many([TicketRecord(id=f"{tag}{i}", text=f"my {labels[i % len(labels)]} problem {i}",
                                               label=labels[i % len(labels)]) for i in range(36)])


@pytest.fixture
def processes() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []

    def start(*args: str, env: dict[str, str] | None = None, log: Path) -> subprocess.Popen[bytes]:
        process = subprocess.Popen([str(FED_PYTHON), *args], env={**os.environ, **(env or {})},
                                   stdout=log.open("wb"), stderr=subprocess.STDOUT)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()


def test_a_round_survives_a_lost_site_an_idle_one_nan_weights_and_an_unknown_key(
        serve: Callable[[Settings], LiveService], processes: Callable[..., subprocess.Popen[bytes]],
        tmp_path: Path) -> None:
    assert federation_python() == str(FED_PYTHON)
    # Each site its own mix of the window's intents (not identically distributed).
    mixes = {"east": ("card_arrival", "exchange_rate"), "west": ("exchange_rate", "top_up_failed"),
             "north": ("card_arrival", "top_up_failed")}
    sites = {name: serve(tiny_settings(tmp_path / name, None, train=QUICK, gate=TINY_GATE))
             for name in [*mixes, "south"]}
    for name, labels in mixes.items():  # south has no tickets yet
        add_window(sites[name], name, labels)
    started_with = {name: live.service.registry.live for name, live in sites.items()}
    (tmp_path / "sites.json").write_text(json.dumps({k: v for k, v in KEYS.items() if k != "rogue"}
                                                    | {"nan": KEYS["rogue"]}))
    hub_address, out = f"127.0.0.1:{free_port()}", tmp_path / "hub"
    hub = processes("-m", "service.federation.hub", "--sites", str(tmp_path / "sites.json"), "--address",
                    hub_address, "--rounds", "1", "--quorum", "2", "--wait-for", "6", "--out", str(out),
                    "--gate", TINY_GATE.model_dump_json(), "--round-timeout", "300", log=tmp_path / "hub.log")
    clients = {name: processes("-m", "service.federation.site_client", "--hub", hub_address, "--name", name,
                               "--service", live.url, log=tmp_path / f"{name}.log",
                               env={"EVERGREEN_FEDERATION_KEY": KEYS[name], "EVERGREEN_SITE_API_KEY":
                                    live.admin["Authorization"].removeprefix("Bearer ")})
               for name, live in sites.items()}
    (tmp_path / "rogue.py").write_text(ROGUE)
    processes(str(tmp_path / "rogue.py"), "nan", hub_address, "nan", KEYS["rogue"], log=tmp_path / "nan.log")
    processes(str(tmp_path / "rogue.py"), "unknown", hub_address, "mallory", "not-a-key-the-hub-knows",
              log=tmp_path / "mallory.log")

    # North's client is lost while its site trains: the round goes on without it.
    north = sites["north"].service.updates
    wait_for(lambda: north.current is not None and north.current.trigger == "federated round 1: fit", 120,
             "north's fit", every=0.05)
    clients["north"].send_signal(signal.SIGKILL)
    try:
        hub.wait(timeout=400)
    except subprocess.TimeoutExpired:
        pytest.fail("the hub did not finish: " + (tmp_path / "hub.log").read_text()[-3000:])
    assert hub.returncode == 0, (tmp_path / "hub.log").read_text()[-3000:]

    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    first, delivery = rounds
    assert sorted(first["fit"]) == ["east", "west"], first
    assert first["refused"] == {"nan": "NaN or infinite weights", "mallory": "unknown site or wrong signature"}
    assert len(first["fit_failures"]) == 1  # north, lost mid-fit
    assert list(first["idle"]) == ["south"] and first["idle"]["south"].startswith("skipped: no new labelled")
    assert sorted(first["evaluated"]) == ["east", "west"] and first["outcome"].startswith("promoted"), first
    assert list(first["not_evaluated"]) == ["south"] and "no fit of round 1" in first["not_evaluated"]["south"]
    pooled = first["gate"]["candidate"]
    assert sum(w["n"] for w in pooled.values()) == sum(s["probes"] for s in first["evaluated"].values())
    assert delivery["delivers_round"] == 1 and "outcome" not in delivery

    # Every site still connected serves the same federated version, with the hub's report (south
    # learned no window of its own in it); north, gone, kept its own.
    versions = {name: sites[name].service.registry.live for name in ("east", "west", "south")}
    for name, version in versions.items():
        assert version != started_with[name]
        info = sites[name].service.registry.info(version)
        assert info.gate is not None and info.gate.passed and info.windows_trained == ([] if name == "south" else [1])
        assert first["outcome"] == f"promoted: {info.gate.reason}"
    east, *others = (load_file(sites[n].service.registry.path(v) / ADAPTER_WEIGHTS) for n, v in versions.items())
    assert all(other.keys() == east.keys() and all(torch.equal(east[k], other[k]) for k in east) for other in others)
    assert sites["north"].service.registry.live == started_with["north"]
