"""FastAPI dependencies: the running service and API-key scopes."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.core import Service
from service.settings import Scope


def get_service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


ServiceDep = Annotated[Service, Depends(get_service)]
VERSION_HEADER = "X-Evergreen-Adapter-Version"  # on every answer: the adapter version that gave it
_bearer = HTTPBearer(auto_error=False, description="An API key with the scope the route needs.")


Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _authorize(service: Service, credentials: HTTPAuthorizationCredentials | None, scope: Scope) -> None:
    if credentials is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing API key (Authorization: Bearer <key>)",
                            headers={"WWW-Authenticate": "Bearer"})
    given = credentials.credentials.encode()
    key = next((k for k in service.settings.api.keys
                if hmac.compare_digest(k.key.get_secret_value().encode(), given)), None)
    if key is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "unknown API key",
                            headers={"WWW-Authenticate": "Bearer"})
    if scope not in key.scopes:
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"this key lacks the `{scope}` scope")


def require(scope: Scope) -> Callable[..., None]:
    """A dependency that lets the request through only with a key holding `scope`."""

    def check(service: ServiceDep, credentials: Credentials) -> None:
        _authorize(service, credentials, scope)

    return check


def require_query(service: ServiceDep, credentials: Credentials) -> None:
    """The `query` scope, when `api.require_query_key` asks for it (always in production)."""
    if service.settings.api.require_query_key:
        _authorize(service, credentials, "query")


AdminDep = Annotated[None, Depends(require("admin"))]
IngestDep = Annotated[None, Depends(require("ingest"))]
QueryDep = Annotated[None, Depends(require_query)]


def require_primary(service: ServiceDep) -> None:
    """Changes to the registry and updates happen on the primary; replicas only serve."""
    if service.replica:
        raise HTTPException(status.HTTP_409_CONFLICT,
                            "this instance is a serve-only replica: promote, roll back and update on the primary")


PrimaryDep = Annotated[None, Depends(require_primary)]
