"""One settings tree: defaults < TOML file < EVERGREEN_* environment; secrets masked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from service.cli import app
from service.settings import CONFIG_FILE_ENV, Settings


def test_environment_overrides_file_overrides_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "evergreen.toml"
    config.write_text('[kafka]\nbootstrap = "file:9092"\ntopic = "from-file"\n[train]\nepochs = 2.0\n')
    monkeypatch.setenv(CONFIG_FILE_ENV, str(config))
    monkeypatch.setenv("EVERGREEN_KAFKA_BOOTSTRAP", "env:9092")
    monkeypatch.setenv("EVERGREEN_TRAIN_LEARNING_RATE", "0.001")
    settings = Settings()
    assert settings.kafka.bootstrap == "env:9092"
    assert settings.kafka.topic == "from-file"
    assert settings.train.epochs == 2.0 and settings.train.learning_rate == 0.001
    assert settings.kafka.group_id == "evergreen-ingest"


def test_production_refuses_development_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVERGREEN_ENVIRONMENT", "production")
    monkeypatch.setenv("EVERGREEN_KAFKA_BOOTSTRAP", "kafka:9092")
    with pytest.raises(ValidationError, match="development key"):
        Settings()
    # Issue 13: a 2-character key was accepted in production.
    monkeypatch.setenv("EVERGREEN_API_KEYS", '[{"key": "s3", "scopes": ["admin"]}]')
    with pytest.raises(ValidationError, match="at least 16 characters"):
        Settings()
    monkeypatch.setenv("EVERGREEN_API_KEYS", '[{"key": "s3cret-s3cret-s3cret", "scopes": ["admin"]}]')
    assert Settings().api.keys[0].scopes == {"admin"}
    monkeypatch.setenv("EVERGREEN_ENVIRONMENT", "development")  # short keys stay fine on a laptop
    monkeypatch.setenv("EVERGREEN_API_KEYS", '[{"key": "s3", "scopes": ["admin"]}]')
    assert Settings().api.keys[0].scopes == {"admin"}


def test_config_show_prints_effective_settings_with_secrets_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVERGREEN_API_KEYS", '[{"key": "s3cret", "scopes": ["query"]}]')
    monkeypatch.setenv("EVERGREEN_KAFKA_BOOTSTRAP", "broker:9092")
    result = CliRunner().invoke(app, ["config", "show"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown["kafka"]["bootstrap"] == "broker:9092"
    assert "s3cret" not in result.stdout and shown["api"]["keys"][0]["key"] == "**********"


def test_settings_reference_matches_the_settings_tree() -> None:
    """docs/settings.md is generated from the tree; a new or changed setting must regenerate it."""
    from service.settings_doc import reference

    committed = (Path(__file__).parents[2] / "docs" / "settings.md").read_text()
    assert committed == reference(), "run: evergreen config reference > docs/settings.md"
