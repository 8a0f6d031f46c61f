"""The HTTP application: routers per resource, request metrics, a bound on every body."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, Response

from service import errors
from service.core import Service
from service.routes import (
    adapters,
    buffer,
    classify,
    console,
    federation,
    forgetting,
    health,
    openai,
    privacy,
    tickets,
    updates,
)


def create_app(service: Service) -> FastAPI:
    app = FastAPI(title="Evergreen", version="0.1.0",
                  description="Keeps a live language model adapted to a ticket stream, without forgetting.",
                  max_body_size=service.settings.api.max_body_bytes)
    app.state.service = service
    errors.install(app)

    @app.middleware("http")
    async def measure(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        service.http_metrics.observe(request.method, getattr(route, "path", "unmatched"),
                                     response.status_code, time.perf_counter() - started)
        return response

    for module in (console, health, classify, openai, adapters, updates, privacy, forgetting, buffer, tickets):
        app.include_router(module.router)
    # Adapters travel whole: the bound is the federation's own, base64 in JSON a third over it.
    app.include_router(federation.router, max_body_size=service.settings.federation.max_weights_bytes * 4 // 3
                       + service.settings.api.max_body_bytes)
    app.mount("/console", console.assets(), name="console")
    return app
