"""The HTTP application: routers per resource, request metrics, body-size limit."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from service.core import Service
from service.routes import adapters, buffer, classify, health, updates


def create_app(service: Service) -> FastAPI:
    app = FastAPI(title="Evergreen", version="0.1.0",
                  description="Keeps a live language model adapted to a ticket stream, without forgetting.")
    app.state.service = service
    limit = service.settings.api.max_body_bytes

    @app.middleware("http")
    async def limit_and_measure(request: Request,
                                call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        started = time.perf_counter()
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            response: Response = JSONResponse(
                {"detail": f"request body over the {limit}-byte limit"}, status_code=413)
        else:
            response = await call_next(request)
        route = request.scope.get("route")
        service.http_metrics.observe(request.method, getattr(route, "path", "unmatched"),
                             response.status_code, time.perf_counter() - started)
        return response

    for module in (health, classify, adapters, updates, buffer):
        app.include_router(module.router)
    return app
