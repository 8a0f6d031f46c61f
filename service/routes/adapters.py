from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, status
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

from learners.reports import GateReport, GateSummary
from service.core import Service
from service.deps import VERSION_HEADER, AdminDep, PrimaryDep, ServiceDep
from service.errors import responses
from service.export import ExportError, UnsupportedExport
from service.export_config import ExportFormat, Quant
from service.registry import Entry, Override, RegistryError, VersionInfo
from service.routes import DEFAULT_ROWS, Before, Limit
from service.runtime import UnsafeAdapter

router = APIRouter(prefix="/v1", tags=["adapters"])
SHA256_HEADER = "X-Evergreen-Sha256"  # on an export: the file's sha256, hex


class AdapterRecord(BaseModel):
    """A version as users see it (never its filesystem path), but for its gate report."""

    name: str
    parent: str | None
    created_at: float
    verdict: str
    live: bool
    windows_trained: list[int]
    labels: list[str]
    overrides: list[Override]
    pruned_at: float | None = Field(description="When retention deleted its weights (`registry.keep_*`): a "
                                                "pruned version is listed for its record but cannot be loaded.")


class AdapterPublic(AdapterRecord):
    """A version with its whole gate report."""

    gate: GateReport | None = Field(description="None for the first version, which was never gated.")


class AdapterSummary(AdapterRecord):
    """A version as a listing shows it: its gate report without the per-window figures, which
    `GET /v1/adapters/{version}` serves."""

    gate: GateSummary | None = Field(description="None for the first version, which was never gated.")


class AdapterList(BaseModel):
    live: str | None
    live_since: float | None = Field(description="Unix time the live pointer last moved (promotion or rollback).")
    adapters: list[AdapterSummary] = Field(description="Oldest first: the newest `limit` (before `before`), and the "
                                                       "live version wherever it is.")
    total: int = Field(description="Versions in the registry, pruned ones included.")


def _public(info: VersionInfo, live: str | None) -> AdapterPublic:
    return AdapterPublic(name=info.name, parent=info.parent, created_at=info.created_at,
                         verdict=info.verdict, live=info.name == live,
                         windows_trained=info.windows_trained, labels=info.labels, gate=info.gate,
                         overrides=info.overrides, pruned_at=info.pruned_at)


def _summary(entry: Entry, live: str | None) -> AdapterSummary:
    return AdapterSummary(name=entry.name, parent=entry.parent, created_at=entry.created_at,
                          verdict=entry.verdict, live=entry.name == live,
                          windows_trained=list(entry.windows_trained), labels=list(entry.labels), gate=entry.gate,
                          overrides=list(entry.overrides), pruned_at=entry.pruned_at)


def _info(service: Service, version: str) -> VersionInfo:
    """`version`'s whole metadata; 404 for a name the registry did not make."""
    try:
        return service.registry.info(version)
    except (RegistryError, FileNotFoundError) as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"unknown adapter version {version!r}") from exc


@router.get("/adapters", responses=responses(404))
def list_adapters(
        service: ServiceDep,
        limit: Limit = DEFAULT_ROWS,
        before: Before = None,
) -> AdapterList:
    """The registry's versions with a summary of their gate reports, oldest first, and which one
    is live. The registry only grows, so a page is returned: the newest by default, older ones
    with `before`. Each version's whole gate report is at `GET /v1/adapters/{version}`."""
    live = service.registry.live
    try:
        names = service.registry.page(limit, before)
    except RegistryError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"unknown adapter version {before!r}") from exc
    return AdapterList(live=live, live_since=service.registry.live_since,
                       adapters=[_summary(service.registry.entry(n), live) for n in names],
                       total=len(service.registry.names()))


@router.get("/adapters/{version}", responses=responses(404))
def get_adapter(service: ServiceDep, version: str) -> AdapterPublic:
    """One version with its whole gate report: every window's scores and every check."""
    return _public(_info(service, version), service.registry.live)


@router.post("/adapters/{version}/load", responses=responses(401, 403, 404, 409))
def load(*, service: ServiceDep, _admin: AdminDep, version: str) -> AdapterPublic:
    """Load and check `version` without serving it, so that promoting it later only moves the
    live pointer. It is kept among the `serving.cached_versions` until used or evicted (with
    none cached, the default, it is only checked)."""
    info = _info(service, version)
    try:
        service.runtime.prepare(version)
    except (RegistryError, UnsafeAdapter) as exc:  # it exists, but cannot be loaded (pruned, unsafe)
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
    return _public(info, service.registry.live)


@router.get("/adapters/{version}/export", response_class=FileResponse,
            responses={200: {"content": {"application/octet-stream": {}},
                             "description": f"The GGUF file, its sha256 in `{SHA256_HEADER}`."},
                       **responses(400, 401, 403, 404, 409)})
def export(
        *, service: ServiceDep, _admin: AdminDep, version: str,
        file_format: Annotated[ExportFormat, Query(alias="format", description="File format.")] = "gguf",
        quant: Annotated[Quant, Query(description="Weight type: `f16`, `q8_0` or `q4_0` (an adapter: `f16` or "
                                                  "`q8_0`); vectors stay f32.")] = "q8_0",
        adapter_only: Annotated[bool, Query(description="The LoRA adapter alone, for llama.cpp's `--lora` on the "
                                                        "base model's GGUF, instead of the merged model.")] = False,
) -> FileResponse:
    """`version` (or `live`) as a GGUF file for llama.cpp and ollama: merged into the base weights as
    it is served, or its LoRA adapter alone. Made once per version and quantization, then served from
    the registry (409: the version was pruned, or cannot be exported so; 400: no adapter in 4 bits)."""
    try:
        name = service.exporter.resolve(version)
    except RegistryError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc
    _info(service, name)
    try:
        exported = service.exporter.export(name, quant, adapter_only)
    except UnsupportedExport as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(exc)) from exc
    except (RegistryError, ExportError, UnsafeAdapter) as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
    return FileResponse(exported.path, media_type="application/octet-stream", filename=exported.filename,
                        headers={SHA256_HEADER: exported.sha256, VERSION_HEADER: exported.version})


@router.post("/adapters/{version}/promote", responses=responses(401, 403, 404, 409))
def promote(*, service: ServiceDep, _admin: AdminDep, _primary: PrimaryDep, version: str) -> AdapterPublic:
    """Serve `version`. Promoting a version the gate rejected is recorded as an override."""
    info = _info(service, version)
    try:
        service.live.promote(version)
    except (RegistryError, UnsafeAdapter) as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
    if info.verdict == "rejected":
        info.overrides.append(Override(action="promote", at=time.time()))
        service.registry.record(info)
    return _public(info, service.registry.live)


@router.post("/rollback", responses=responses(401, 403, 409))
def rollback(*, service: ServiceDep, _admin: AdminDep, _primary: PrimaryDep) -> AdapterPublic:
    """Serve the version that was live before the current one."""
    try:
        previous = service.live.rollback()
    except (RegistryError, UnsafeAdapter) as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
    return _public(service.registry.info(previous), previous)
