"""`evergreen federate hub|site` as an operator first types them: what is missing is named, and the
hub refuses a sites file it cannot trust before it listens."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from service.cli import app

FED_PYTHON = Path(__file__).resolve().parents[2] / ".venv-fed" / "bin" / "python"


def test_what_is_missing_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sites = tmp_path / "sites.json"
    sites.write_text(json.dumps({"east": "east-key-0123456789"}))
    monkeypatch.setenv("EVERGREEN_FEDERATION_PYTHON", str(tmp_path / "nope"))
    missing = CliRunner().invoke(app, ["federate", "hub", "--sites", str(sites)])
    assert missing.exit_code != 0 and "make federation" in missing.output
    monkeypatch.delenv("EVERGREEN_FEDERATION_KEY", raising=False)
    keyless = CliRunner().invoke(app, ["federate", "site", "--hub", "127.0.0.1:1", "--name", "east"])
    assert keyless.exit_code != 0 and "EVERGREEN_FEDERATION_KEY" in keyless.output


@pytest.mark.skipif(not FED_PYTHON.exists(), reason="the federation's environment: `make federation`")
@pytest.mark.parametrize(("keys", "quorum", "why"), [
    ({"east": "short"}, "1", "at least 16 characters"),
    ({"east": "east-key-0123456789"}, "2", "--quorum 2 must be between 1 and the 1 sites"),
])
def test_the_hub_refuses_short_keys_and_an_impossible_quorum(tmp_path: Path, keys: dict[str, str], quorum: str,
                                                             why: str) -> None:
    sites = tmp_path / "sites.json"
    sites.write_text(json.dumps(keys))
    hub = subprocess.run([str(FED_PYTHON), "-m", "service.federation.hub", "--sites", str(sites), "--quorum", quorum,
                          "--out", str(tmp_path / "hub")], capture_output=True, text=True, timeout=120)
    assert hub.returncode != 0 and why in hub.stderr, hub.stderr[-2000:]
