"""Error bodies: FastAPI's `{"detail": ...}` everywhere, plus OpenAI's `{"error": {...}}` shape on
the OpenAI-compatible routes, so unchanged OpenAI clients show the message to their users."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

OPENAI_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/models")
_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
          409: "conflict_error", 413: "request_too_large"}


_DESCRIPTIONS = {
    400: "The request is well-formed but cannot be served as asked.",
    401: "Missing or unknown API key (`Authorization: Bearer <key>`).",
    403: "The API key lacks the scope this route needs.",
    404: "No such resource.",
    409: "The request conflicts with the instance's state.",
    413: "The request body is over `api.max_body_bytes`, or the work it asks for over its budget.",
    503: "A dependency (the Kafka broker) did not answer in time; retry after `Retry-After` seconds.",
}


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer but 422 (whose `detail` is FastAPI's list of validation errors)."""

    detail: str = Field(description="What went wrong, for a person to read.")


class OpenAIError(BaseModel):
    message: str
    type: str
    param: str | None
    code: int


class OpenAIErrorBody(BaseModel):
    """The error body of the OpenAI-compatible routes: `detail`, and OpenAI's `error` object."""

    detail: Any = Field(description="The message, or the validation errors of a 422.")
    error: OpenAIError


def responses(*codes: int, descriptions: dict[int, str] | None = None,
              openai: bool = False) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` of a route's error answers, so the document lists every status it gives."""
    model = OpenAIErrorBody if openai else ErrorBody
    return {code: {"model": model, "description": (descriptions or {}).get(code, _DESCRIPTIONS[code])}
            for code in codes}


def _openai(request: Request) -> bool:
    return request.url.path.startswith(OPENAI_PATHS)


def _body(status: int, message: str, detail: object) -> dict[str, object]:
    return {"detail": detail, "error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"),
                                        "param": None, "code": status}}


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if not _openai(request) or exc.status_code == 413:
        return await http_exception_handler(request, exc)
    return JSONResponse(_body(exc.status_code, str(exc.detail), exc.detail), exc.status_code,
                        headers=getattr(exc, "headers", None))


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    if not _openai(request):
        return await request_validation_exception_handler(request, exc)
    errors = exc.errors()
    message = "; ".join(f"`{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}`: {e['msg']}" for e in errors[:5])
    return JSONResponse(_body(422, message, jsonable_encoder(errors)), 422)


def install(app: FastAPI) -> None:
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
