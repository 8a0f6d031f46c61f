from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Response, status
from pydantic import BaseModel, Field

from service.deps import VERSION_HEADER, QueryDep, ServiceDep
from service.errors import responses
from service.runtime import NoLabels

router = APIRouter(prefix="/v1", tags=["classify"])


class ClassifyRequest(BaseModel):
    text: str = Field(min_length=1, max_length=16_384, description="The ticket to classify.")
    labels: list[Annotated[str, Field(min_length=1, max_length=128)]] | None = Field(
        None, min_length=1, max_length=512,
        description="Candidate labels; default: every label the serving version has learned.",
    )
    top_k: int = Field(3, ge=1, le=50, description="How many ranked labels to return.")


class ScoredLabel(BaseModel):
    label: str
    confidence: float


class ClassifyResponse(BaseModel):
    label: str
    confidence: float = Field(description="Probability of the label among the candidates: the model's, weighed "
                                          "with the vote of the ticket's nearest labelled tickets in the buffer "
                                          "(`replay.vote_weight`).")
    top: list[ScoredLabel]
    adapter_version: str = Field(description="The adapter version that answered.")
    labels_from: Literal["request", "version", "buffer"] = Field(
        description="Where the candidates came from: the request's `labels`, the labels the serving version "
                    "learned, or (before any version has learned one) the labels the buffer holds.")
    zero_shot: bool = Field(description="The serving version has learned no labels yet: the candidates are the "
                                        "buffer's labels, scored by the base model's priors for their words.")
    candidates: int = Field(description="How many labels were scored.")
    shortlist: list[str] | None = Field(
        None, description="The labels scored when the candidates were shortlisted by the ticket's nearest "
                          "labelled neighbours in the buffer (`serving.shortlist_labels`): the confidences are "
                          "among these. Null when every candidate was scored.")


@router.post("/classify", responses=responses(400, 401, 403, 409, 413, descriptions={
    400: "The body is not valid JSON.",
    409: "No version has learned a label, the buffer holds none, and the request names none.",
    413: "The body is over `api.max_body_bytes`, or the prompt and label tokens over "
         "`serving.max_classify_tokens`."}))
def classify(body: ClassifyRequest, service: ServiceDep, _query: QueryDep, response: Response) -> ClassifyResponse:
    """Label a ticket by the log-likelihood of each candidate label.

    Until a version has learned labels, the labels the buffer holds are scored zero-shot (the
    answer says so), so the endpoint is useful from the first labelled ticket on. A request's
    work is bounded: its prompt tokens plus the tokens of the labels it names may not exceed
    `serving.max_classify_tokens` (413). Many labels are scored a chunk at a time, taking turns
    with other requests. When the version's (or the buffer's) labels outnumber
    `serving.shortlist_labels`, only those its nearest neighbours in the buffer vote for are scored,
    and the answer lists them. The nearest neighbours' vote also weighs in the answer beside the
    model's scores (`replay.vote_weight`): the buffer keeps every window's intents, where the
    model leans towards the ones it learned last.
    """
    budget = service.settings.serving.max_classify_tokens
    if body.labels and (work := service.runtime.classify_work(body.text, body.labels)) > budget:
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE,
                            f"this request is {work} tokens of prompt and labels, over the budget of {budget} "
                            "(`serving.max_classify_tokens`): send fewer or shorter labels")
    labels, source = body.labels, "request"
    if labels is None:
        learned = service.runtime.labels
        labels, source = (None, "version") if learned else (list(service.buffer.label_counts()) or None, "buffer")
    serving = service.settings.serving
    [advice] = service.buffer.advise([body.text], labels or service.runtime.labels,
                                     0 if source == "request" else serving.shortlist_labels,
                                     serving.shortlist_neighbours)
    try:
        result = service.batcher.classify(body.text, labels, body.top_k, shortlist=advice.shortlist,
                                          votes=advice.votes)
    except NoLabels as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, f"{exc}, and the buffer holds no labelled ticket") from exc
    response.headers[VERSION_HEADER] = result.adapter_version
    return ClassifyResponse(label=result.label, confidence=result.confidence,
                            top=[ScoredLabel(label=name, confidence=p) for name, p in result.top],
                            adapter_version=result.adapter_version, labels_from=source,
                            zero_shot=source == "buffer", candidates=result.candidates,
                            shortlist=list(result.shortlist) if result.shortlist else None)

