"""A year of history: what serving the registry's records costs at hundreds of versions.

Builds a registry and accuracy matrix as a long-running service leaves them, through the
product's own bookkeeping (`AdapterRegistry.draft`/`publish`/`promote`/`prune` with the default
retention, `AccuracyMatrix.record_gate`): a chain of N versions, each warm-started from the
version live when it was trained and learning the next of W windows, its gate report scoring
candidate and live on every window learned so far (the worst case: the gate's probe budget
scores a subset once windows outnumber it) and the base model on the new one; a share of them
rejected, so the next candidate learns their window again (N updates: N + 1 versions with the
initial, untrained one). The adapter files are the tiny
llama's untrained adapter, copied.

Then a real uvicorn server over that registry (the service as `evergreen serve` builds it, on the
tiny llama) answers the history requests, each timed over HTTP (median of `--repeats`):
`/v1/forgetting`, `/v1/adapters`, the live version's whole gate report (`/v1/adapters/{version}`),
`/v1/models`, `/metrics`, and the console's refresh (every request `service/console/app.js`
polls, as it writes them). Last, one update's bookkeeping on that registry: the forgetting
reference of the live lineage, publishing a candidate, recording its gate in the matrix,
promoting it and pruning.

Baseline, measured in the same run: the same requests after `--baseline` updates over as many
windows (10). Prints every figure with its ratio to the baseline; writes bench/results/history.json.

    nice -n 19 .venv/bin/evergreen bench history -- [--versions 300] [--windows 300]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from learners.base_model import TINY_LLAMA, resolve_base_model
from learners.config import GateSettings, TrainSettings
from learners.reports import GateReport, WindowScore
from service.app import create_app
from service.core import Service
from service.forgetting import AccuracyMatrix, best_before
from service.registry import AdapterRegistry, VersionMetadata
from service.settings import ApiSettings, ModelSettings, RegistrySettings, SchedulerSettings, Settings
from service.update_manager import ensure_initial_version
from streams.broker import free_port

ROOT = Path(__file__).resolve().parents[1]
RETENTION = RegistrySettings()


def console_paths() -> list[str]:
    """The requests the console polls, as app.js writes them (its SOURCES)."""
    sources = re.search(r"const SOURCES = \{(.*?)\};", (ROOT / "service/console/app.js").read_text(), re.DOTALL)
    assert sources is not None, "app.js no longer declares its SOURCES"
    return re.findall(r'"(/v1/[^"]*)"', sources.group(1))


class History:
    """The registry and matrix of one data directory, grown one update at a time."""

    def __init__(self, data: Path, windows: int, seed: int) -> None:
        self.registry = AdapterRegistry(data / "registry")
        self.matrix = AccuracyMatrix(self.registry.root / "accuracy.json")
        self.initial = ensure_initial_version(self.registry, resolve_base_model(TINY_LLAMA, ModelSettings().cache_dir),
                                              TrainSettings())
        self.windows = windows
        self.rng = random.Random(seed)
        self.learned_at: dict[int, int] = {}  # window -> update that first learned it
        self.updates = 0

    def score(self, window: int, update: int, skill: float) -> WindowScore:
        """A plausible accuracy: high once learned, drifting down slowly, noisy."""
        since = update - self.learned_at.get(window, update)
        accuracy = min(1.0, max(0.0, skill - 0.0005 * since + self.rng.gauss(0, 0.02)))
        return WindowScore(accuracy=accuracy, loss=1.0 - accuracy, n=20)

    def update(self, rejected: bool, prune: bool = True) -> str:
        """One update's bookkeeping, as UpdateManager does it after the worker's gate."""
        self.updates += 1
        live = self.registry.live
        assert live is not None
        live_info = self.registry.info(live)
        best_before(self.registry, self.matrix, live)  # the reference the worker's gate gets
        trained = set(live_info.windows_trained)
        new = min(self.updates, self.windows)
        self.learned_at.setdefault(new, self.updates)
        windows = sorted({*trained, new})
        gate = GateReport(
            passed=not rejected, reason="rejected: forgot window 1" if rejected else "all checks passed",
            new_windows=(new,), thresholds=GateSettings(),
            candidate={w: self.score(w, self.updates, 0.85 if rejected else 0.95) for w in windows},
            live={w: self.score(w, self.updates, 0.9) for w in windows},
            base={new: self.score(new, self.updates, 0.3)})
        with self.registry.draft() as draft:
            for file in self.registry.path(self.initial).iterdir():
                if file.is_file():
                    shutil.copy(file, draft.path / file.name)
            info = self.registry.publish(draft, VersionMetadata(
                parent=live, verdict="rejected" if rejected else "accepted", windows_trained=windows,
                labels=[f"intent {w}" for w in windows], gate=gate))
        self.matrix.record_gate(info.name, live, gate)
        if not rejected:
            self.registry.promote(info.name)
        if prune:
            self.registry.prune(RETENTION.keep_rejected, RETENTION.keep_superseded)
        return info.name


def build(data: Path, versions: int, windows: int, rejected_share: float, seed: int) -> History:
    history = History(data, windows, seed)
    started = time.perf_counter()
    for k in range(1, versions + 1):  # after the initial version
        # Retention is idempotent: pruning every 10th update leaves what pruning every one would.
        history.update(rejected=k > 1 and history.rng.random() < rejected_share, prune=k % 10 == 0)
        if k % 50 == 0:
            print(f"  built {k + 1} versions ({time.perf_counter() - started:.0f} s)", flush=True)
    return history


def timed(call: Callable[[], list[bytes]], repeats: int) -> tuple[float, float | None, int]:
    """Milliseconds of the first call (cold: the first request after a start) and the median of
    `repeats` more; bytes of the first answers."""
    samples, size = [], 0
    for i in range(1 + repeats):
        started = time.perf_counter()
        answers = call()
        samples.append(time.perf_counter() - started)
        size = size if i else sum(map(len, answers))
    return samples[0] * 1000, statistics.median(samples[1:]) * 1000 if repeats else None, size


def measure(data: Path, history: History, repeats: int) -> dict[str, Any]:
    """The history requests over HTTP against a real server on `data`, then one update's bookkeeping."""
    settings = Settings(data_dir=data, model=ModelSettings(base=TINY_LLAMA), scheduler=SchedulerSettings(enabled=False),
                        api=ApiSettings(port=free_port()))
    service = Service(settings)
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=settings.api.port,
                                           log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    figures: dict[str, Any] = {"versions": len(history.registry.names()), "windows": len(history.matrix.windows())}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{settings.api.port}", timeout=3600) as client:
            def get(path: str) -> bytes:
                response = client.get(path)
                response.raise_for_status()
                return response.content

            requests = {"forgetting": ["/v1/forgetting"], "adapters": ["/v1/adapters"],
                        "live_adapter": [f"/v1/adapters/{history.registry.live}"], "models": ["/v1/models"],
                        "metrics": ["/metrics"]}
            console = console_paths()
            figures["console_paths"] = console
            requests["console_refresh"] = console
            for name, paths in requests.items():
                figures[f"{name}_first_ms"], figures[f"{name}_ms"], figures[f"{name}_bytes"] = timed(
                    lambda ps=paths: [get(p) for p in ps], repeats)  # type: ignore[misc]
        # The service's own registry and matrix objects, as its UpdateManager uses them.
        history.registry, history.matrix = service.registry, service.matrix
        started = time.perf_counter()
        history.update(rejected=False)
        figures["update_bookkeeping_ms"] = (time.perf_counter() - started) * 1000
        figures["accuracy_json_bytes"] = (data / "registry" / "accuracy.json").stat().st_size
    finally:
        server.should_exit = True
        service.stop()
    return figures


def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--versions", type=int, default=300, help="updates after the initial version")
    parser.add_argument("--windows", type=int, default=300)
    parser.add_argument("--baseline", type=int, default=10, help="updates and windows of the baseline")
    parser.add_argument("--rejected-share", type=float, default=0.2)
    parser.add_argument("--repeats", type=int, default=5, help="timed requests after the first (0: the first only, "
                        "where each takes minutes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "history.json")
    args = parser.parse_args()
    results: dict[str, Any] = {"load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="evergreen-history-") as scratch:
        for label, versions, windows in (("baseline", args.baseline, args.baseline),
                                         ("large", args.versions, args.windows)):
            data = Path(scratch) / label
            started = time.perf_counter()
            history = build(data, versions, windows, args.rejected_share, args.seed)
            print(f"{label}: built {versions} versions x {windows} windows in {time.perf_counter() - started:.1f} s",
                  flush=True)
            results[label] = measure(data, history, args.repeats)
    results["load_after"] = os.getloadavg()
    base, large = results["baseline"], results["large"]
    print(f"\n{'':26}{'baseline':>14}{'large':>16}{'ratio':>9}   "
          f"({base['versions']}x{base['windows']} vs {large['versions']}x{large['windows']})")
    for key in [k for k in large if k.endswith(("_ms", "_bytes")) and large[k] is not None]:
        ratio = large[key] / base[key] if base[key] else float("nan")
        results.setdefault("ratios", {})[key] = ratio
        unit = "ms" if key.endswith("_ms") else "B"
        print(f"{key:26}{base[key]:>12,.1f}{unit:>2}{large[key]:>14,.1f}{unit:>2}{ratio:>8.1f}x")
    print(f"load average before {results['load_before'][0]:.2f}, after {results['load_after'][0]:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
