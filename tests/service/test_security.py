"""Auth scopes on every route that needs one, and a schemathesis run that finds no 5xx."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from pydantic import SecretStr

from service.settings import DEV_ADMIN_KEY, ApiKey, ApiSettings, ServingSettings, Settings
from streams.broker import free_port
from tests.conftest import LiveService, tiny_settings

KEYS = {scope: f"{scope}-key" for scope in ("query", "ingest", "admin")}
CHAT = {"model": "live", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
# (method, path, body, the scope it needs)
ROUTES = [
    ("POST", "/v1/classify", {"text": "card", "labels": ["a", "b"]}, "query"),
    ("POST", "/v1/chat/completions", CHAT, "query"),
    ("POST", "/v1/completions", {"model": "live", "prompt": "hi", "max_tokens": 1}, "query"),
    ("GET", "/v1/models", None, "query"),
    ("GET", "/v1/models/live", None, "query"),
    ("POST", "/v1/adapters/v0000/promote", None, "admin"),
    ("GET", "/v1/adapters/v0000/export?quant=f16&adapter_only=true", None, "admin"),
    ("POST", "/v1/rollback", None, "admin"),
    ("POST", "/v1/updates", None, "admin"),
]


def test_auth_matrix(serve: Callable[[Settings], LiveService], tmp_path: Path) -> None:
    keys = [ApiKey(key=SecretStr(key), scopes={scope}) for scope, key in KEYS.items()]  # type: ignore[arg-type]
    live = serve(tiny_settings(tmp_path, None, api=ApiSettings(port=free_port(), keys=keys,
                                                              require_query_key=True)))
    client = live.client()
    for method, path, body, needed in ROUTES:
        missing = client.request(method, path, json=body)
        assert missing.status_code == 401, (path, missing.text)
        assert "missing API key" in missing.json()["detail"]
        assert client.request(method, path, json=body,
                              headers={"Authorization": "Bearer wrong"}).status_code == 401
        for scope, key in KEYS.items():
            answer = client.request(method, path, json=body, headers={"Authorization": f"Bearer {key}"})
            if scope == needed:
                assert answer.status_code not in (401, 403), (path, scope, answer.text)
            else:
                assert answer.status_code == 403, (path, scope, answer.text)
                assert f"`{needed}`" in answer.json()["detail"]
    live.service.updates.cancel_and_wait(30)
    # Reading state and probes stays open (no secrets there).
    for path in ("/healthz", "/readyz", "/metrics", "/v1/adapters", "/v1/updates", "/v1/buffer"):
        assert client.get(path).status_code == 200, path


def test_query_key_is_required_by_default_in_production_only() -> None:
    assert Settings().api.require_query_key is False
    production = Settings(environment="production", kafka={"bootstrap": "broker:9092"},
                          api={"keys": [{"key": "s3cret-s3cret-s3cret", "scopes": ["query"]}]})
    assert production.api.require_query_key is True
    assert Settings(environment="production", kafka={"bootstrap": "broker:9092"},
                    api={"keys": [{"key": "s3cret-s3cret-s3cret", "scopes": ["query"]}], "require_query_key": False}
                    ).api.require_query_key is False


def test_schemathesis_finds_the_server_true_to_its_document(serve: Callable[[Settings], LiveService],
                                                            tmp_path: Path) -> None:
    # Query keys required, as in production: the document declares bearer auth on those routes.
    live = serve(tiny_settings(tmp_path, None, serving=ServingSettings(max_tokens=4, default_max_tokens=2,
                                                                       max_prompt_tokens=256),
                               api=ApiSettings(port=free_port(), require_query_key=True)))
    run = subprocess.run(
        [str(Path(sys.executable).parent / "schemathesis"), "run", f"{live.url}/openapi.json",
         "--checks", "all",
         # Starlette's 405 lists only the methods of the route it matched (one per method here).
         # `positive_data_acceptance`: bounds that depend on settings (`serving.max_tokens`, a
         # ticket's text in UTF-8 bytes) are not in the document, so schema-valid bodies can be refused.
         "--exclude-checks", "allow_header_conformance,positive_data_acceptance",
         "--phases", "examples,coverage,fuzzing", "--max-examples", "8",
         "--header", f"Authorization: Bearer {DEV_ADMIN_KEY}", "--workers", "1", "--request-timeout", "60",
         "--seed", "1", "--suppress-health-check", "too_slow", "--no-color"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)  # its cache stays out of the repo
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    live.service.updates.cancel_and_wait(30)
