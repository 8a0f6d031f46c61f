"""`evergreen federate hub|site` as an operator first types them: what is missing is named, and the
hub refuses a sites file it cannot trust before it listens."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EVERGREEN = Path(sys.executable).parent / "evergreen"


def federate(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(EVERGREEN), "federate", *args], cwd=cwd, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120)


def test_what_is_missing_is_named(tmp_path: Path) -> None:
    sites = tmp_path / "sites.json"
    sites.write_text(json.dumps({"east": "east-key-0123456789"}))
    missing = federate("hub", "--sites", str(sites), cwd=tmp_path, EVERGREEN_FEDERATION_PYTHON=str(tmp_path / "nope"))
    assert missing.returncode != 0 and "make federation" in missing.stderr
    keyless = federate("site", "--hub", "127.0.0.1:1", "--name", "east", cwd=tmp_path)
    assert keyless.returncode != 0 and "EVERGREEN_FEDERATION_KEY" in keyless.stderr


def test_the_hub_refuses_short_keys_and_an_impossible_quorum(tmp_path: Path) -> None:
    if not (Path(__file__).resolve().parents[2] / ".venv-fed" / "bin" / "python").exists():
        pytest.skip("the federation's environment: `make federation` (`make test` builds it)")
    sites = tmp_path / "sites.json"
    sites.write_text(json.dumps({"east": "short"}))
    short = federate("hub", "--sites", str(sites), cwd=tmp_path)
    assert short.returncode != 0 and "at least 16 characters" in short.stderr
    sites.write_text(json.dumps({"east": "east-key-0123456789"}))
    quorum = federate("hub", "--sites", str(sites), "--quorum", "2", cwd=tmp_path)
    assert quorum.returncode != 0 and "--quorum 2 must be between 1 and the 1 sites" in quorum.stderr
