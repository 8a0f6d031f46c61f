"""OpenAI-compatible generation: `/v1/chat/completions`, `/v1/completions`, `/v1/models`.

`model` is `live` (whatever version is live when the request starts) or a registry version
name. Every answer names the version that produced it, in `model` and in the
`X-Evergreen-Adapter-Version` header; a streamed answer comes from one version throughout.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Response, status
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from learners.prompts import chat_ids
from service.core import Service
from service.deps import VERSION_HEADER, QueryDep, ServiceDep
from service.errors import responses
from service.generation import PromptTooLong, Sampling, Stream, text_prompt
from service.registry import Entry, RegistryError
from service.runtime import LIVE, UnsafeAdapter

router = APIRouter(prefix="/v1", tags=["generate"])
_SSE = {"text/event-stream": {"schema": {"type": "string"}, "description": "With `stream: true`."}}
# Every error a generation route gives, in the OpenAI error shape (see `service/errors.py`).
_ERRORS = responses(400, 401, 403, 404, 409, 413, openai=True, descriptions={
    400: "`max_tokens`, `stop` or the prompt's length is out of bounds.",
    404: "The `model` names no registry version.",
    409: "The version cannot be served (unsafe weights)."})

ModelName = Annotated[str, Field(min_length=1, max_length=64, description="`live` or a registry version.",
                                 examples=["live"])]
StopStrings = Annotated[str | list[Annotated[str, Field(min_length=1, max_length=64)]] | None, Field(
    None, description="Up to 4 strings that end the answer (not included in it).")]


class TextPart(BaseModel):
    type: Literal["text"]
    text: str = Field(max_length=65_536)


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] = Field(description="Text, or a list of text parts.")

    def plain(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class _Common(BaseModel):
    # The document says what each field's type is: a `seed` of "1" or 1.5 is refused, not coerced.
    model_config = ConfigDict(strict=True)

    model: ModelName
    max_tokens: int | None = Field(None, ge=1, description="Tokens to generate at most "
                                                            "(bounded by `serving.max_tokens`).")
    temperature: float = Field(1.0, ge=0, le=2, description="0: greedy decoding.")
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=1, description="Only one choice per request is generated.")
    stop: StopStrings
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256,
                                        examples=[[{"role": "user", "content": "Where is my card?"}]])
    max_completion_tokens: int | None = Field(None, ge=1, description="Same as `max_tokens`.")


class CompletionRequest(_Common):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)] = Field(
        description="The text to continue (a list must hold exactly one).")
    max_tokens: int | None = Field(16, ge=1, description="Tokens to generate at most "
                                                          "(bounded by `serving.max_tokens`).")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str = Field(description="The adapter version that answered.")
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str = Field(description="The adapter version that answered.")
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "evergreen"
    live: bool = Field(description="Whether this is the version serving `live` requests.")
    verdict: str = Field(description="The gate's verdict on this version.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def _sampling(service: Service, body: _Common, requested: int | None) -> Sampling:
    bound = service.settings.serving.max_tokens
    max_tokens = requested or service.settings.serving.default_max_tokens
    if max_tokens > bound:
        raise HTTPException(status.HTTP_400_BAD_REQUEST,
                            f"`max_tokens` is {max_tokens}; this server generates at most {bound}")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4 or any(not s for s in stop):
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "`stop` takes at most 4 non-empty strings")
    return Sampling(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                    stop=tuple(stop), seed=body.seed)


def _start(service: Service, prompt: list[int], sampling: Sampling, model: str) -> Stream:
    try:
        return service.generator.start(prompt, sampling, model)
    except RegistryError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND,
                            f"unknown model {model!r}: use `live` or a version from GET /v1/models") from exc
    except UnsafeAdapter as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
    except PromptTooLong as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(exc)) from exc


def _usage(stream: Stream) -> Usage:
    u = stream.usage
    return Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                 total_tokens=u.prompt_tokens + u.completion_tokens)


def _sse(stream: Stream, first: dict[str, Any], chunk: Any, last: Any, include_usage: bool) -> StreamingResponse:
    """Server-sent events: `first`, one `chunk(delta)` per text delta, `last(finish)`, [DONE]."""

    def events() -> Iterator[str]:
        if first:
            yield f"data: {json.dumps(first)}\n\n"
        for delta in stream.deltas():
            yield f"data: {json.dumps(chunk(delta))}\n\n"
        final = last(stream.usage.finish_reason)
        if include_usage:
            final["usage"] = _usage(stream).model_dump()
        yield f"data: {json.dumps(final)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={VERSION_HEADER: stream.version, "Cache-Control": "no-cache"})


@router.post("/chat/completions", responses={200: {"content": _SSE}, **_ERRORS})
def chat_completions(body: ChatCompletionRequest, service: ServiceDep, _query: QueryDep,
                     response: Response) -> ChatCompletion:
    """Answer a conversation with the live adapter (or the version named in `model`)."""
    sampling = _sampling(service, body, body.max_completion_tokens or body.max_tokens)
    prompt = chat_ids(service.runtime.tokenizer, [m.plain() for m in body.messages],
                      service.settings.train.system_prompt)  # as replies were learned
    stream = _start(service, prompt, sampling, body.model)
    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        head = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": stream.version}
        return _sse(  # type: ignore[return-value]
            stream, {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                          "finish_reason": None}]},
            lambda d: {**head, "choices": [{"index": 0, "delta": {"content": d}, "finish_reason": None}]},
            lambda f: {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": f}]},
            bool(body.stream_options and body.stream_options.include_usage))
    text = stream.text()
    response.headers[VERSION_HEADER] = stream.version
    return ChatCompletion(id=ident, created=created, model=stream.version, usage=_usage(stream),
                          choices=[ChatChoice(index=0, message=AssistantMessage(content=text),
                                              finish_reason=stream.usage.finish_reason)])


@router.post("/completions", responses={200: {"content": _SSE}, **_ERRORS})
def completions(body: CompletionRequest, service: ServiceDep, _query: QueryDep,
                response: Response) -> Completion:
    """Continue a text prompt with the live adapter (or the version named in `model`)."""
    sampling = _sampling(service, body, body.max_tokens)
    text = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
    stream = _start(service, text_prompt(service.runtime.tokenizer, text), sampling, body.model)
    ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        head = {"id": ident, "object": "text_completion", "created": created, "model": stream.version}
        return _sse(  # type: ignore[return-value]
            stream, {},
            lambda d: {**head, "choices": [{"index": 0, "text": d, "logprobs": None, "finish_reason": None}]},
            lambda f: {**head, "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": f}]},
            bool(body.stream_options and body.stream_options.include_usage))
    answer = stream.text()
    response.headers[VERSION_HEADER] = stream.version
    return Completion(id=ident, created=created, model=stream.version, usage=_usage(stream),
                      choices=[CompletionChoice(index=0, text=answer, finish_reason=stream.usage.finish_reason)])


def _card(entry: Entry, live: str) -> ModelCard:
    return ModelCard(id=entry.name, created=int(entry.created_at), live=entry.name == live, verdict=entry.verdict)


@router.get("/models", responses=responses(401, 403, openai=True))
def list_models(service: ServiceDep, _query: QueryDep) -> ModelList:
    """`live` (an alias of the serving version), then every registry version that can be loaded
    (not pruned), newest first."""
    live = service.runtime.version
    cards = [_card(entry, live) for entry in reversed(service.registry.entries()) if entry.pruned_at is None]
    alias = next(c for c in cards if c.live).model_copy(update={"id": LIVE})
    return ModelList(data=[alias, *cards])


@router.get("/models/{model}", responses=responses(401, 403, 404, openai=True))
def get_model(model: str, service: ServiceDep, _query: QueryDep) -> ModelCard:
    """One version (or `live`) that can be loaded."""
    live = service.runtime.version
    try:
        entry = service.registry.entry(live if model == LIVE else model)
    except RegistryError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"unknown model {model!r}") from exc
    if entry.pruned_at is not None:
        raise HTTPException(status.HTTP_404_NOT_FOUND,
                            f"model {model!r} was pruned by the registry's retention: it can no longer be loaded")
    card = _card(entry, live)
    return card.model_copy(update={"id": LIVE}) if model == LIVE else card
