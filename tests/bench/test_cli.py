"""`evergreen bench NAME` runs a benchmark from any folder, as `python bench/NAME.py` would in the checkout."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EVERGREEN = Path(sys.executable).parent / "evergreen"


@pytest.mark.parametrize("name", ["fairness", "scoring"])  # one imports `bench.serve`, the other its sibling `serve`
def test_a_benchmark_that_imports_its_neighbours_runs_from_outside_the_checkout(name: str, tmp_path: Path) -> None:
    run = subprocess.run([str(EVERGREEN), "bench", name, "--", "--help"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith("usage:") and "--help" in run.stdout
