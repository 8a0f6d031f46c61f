"""`/v1/classify` scores only the labels a ticket's nearest neighbours vote for (real HTTP, real
FAISS buffer, tiny llama), with the scores a full pass gives them, and weighs their vote in."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from learners.scoring import LabelScorer, with_votes
from replay.config import ReplaySettings
from replay.shortlist import vote_shares
from service.settings import ServingSettings, Settings
from streams.records import TicketRecord
from tests.conftest import LiveService, add_versions, classify_concurrently, tiny_settings

TOPICS = {
    "card_arrival": ["my new card has not arrived yet", "when will my card be delivered"],
    "exchange_rate": ["what is the euro to dollar exchange rate", "which rate do you use to convert pounds"],
    "pin_blocked": ["my pin is blocked after three tries", "how do i unblock my pin"],
    "top_up_failed": ["my top up did not go through", "the top up was declined"],
}
LABELS = sorted(TOPICS)
TEXTS = ["has my card been sent? it is not here", "convert dollars to euros at what rate", "pin locked",
         "top up declined again", "card delivery", "what rate for yen"]


def shortlisting(serve: Callable[[Settings], LiveService], tmp_path: Path, size: int = 2,
                 vote_weight: float = 0.0) -> LiveService:
    live = serve(tiny_settings(tmp_path, None, serving=ServingSettings(shortlist_labels=size),
                               replay=ReplaySettings(vote_weight=vote_weight)))
    live.service.buffer.add_many([TicketRecord(id=f"{label}-{i}", text=text, label=label)
                                  for label, texts in TOPICS.items() for i, text in enumerate(texts)])
    return live


def test_classify_answers_among_the_shortlist_with_full_scores(serve: Callable[[Settings], LiveService],
                                                               tmp_path: Path) -> None:
    live = shortlisting(serve, tmp_path)
    client = live.client()
    answer = client.post("/v1/classify", json={"text": TEXTS[0], "top_k": 4}).json()
    # Zero-shot (v0000 learned nothing): the buffer's four labels, two of them scored.
    assert answer["labels_from"] == "buffer" and answer["candidates"] == 2
    assert answer["shortlist"][0] == "card_arrival" and len(answer["shortlist"]) == 2
    assert {t["label"] for t in answer["top"]} == set(answer["shortlist"])
    runtime = live.service.runtime
    run, _ = runtime.resolve(LABELS)
    full = LabelScorer(runtime.tokenizer, LABELS).score_batch(run.model, [TEXTS[0]])[0]  # every label, one pass
    expected = torch.softmax(full[[LABELS.index(label) for label in answer["shortlist"]]], dim=0)
    got = {t["label"]: t["confidence"] for t in answer["top"]}
    assert torch.allclose(torch.tensor([got[label] for label in answer["shortlist"]]), expected, atol=1e-4)

    # A version that has learned the labels: its labels are shortlisted the same way.
    version = add_versions(live.service.registry, 1, LABELS)[0]
    assert client.post(f"/v1/adapters/{version}/promote", headers=live.admin).status_code == 200
    learned = client.post("/v1/classify", json={"text": TEXTS[1]}).json()
    assert learned["labels_from"] == "version" and learned["adapter_version"] == version
    assert learned["shortlist"][0] == "exchange_rate" and learned["candidates"] == 2
    # Labels a request names are all scored.
    named = client.post("/v1/classify", json={"text": TEXTS[1], "labels": LABELS}).json()
    assert named["shortlist"] is None and named["candidates"] == 4


def test_without_a_labelled_neighbour_every_label_is_scored(serve: Callable[[Settings], LiveService],
                                                            tmp_path: Path) -> None:
    live = shortlisting(serve, tmp_path)
    client = live.client()
    unknown = ["refund_request", "cash_fee", "transfer_pending"]  # learned, but none is in the buffer
    version = add_versions(live.service.registry, 1, unknown)[0]
    assert client.post(f"/v1/adapters/{version}/promote", headers=live.admin).status_code == 200
    answer = client.post("/v1/classify", json={"text": TEXTS[0], "top_k": 5}).json()
    assert answer["shortlist"] is None and answer["candidates"] == 3
    assert {t["label"] for t in answer["top"]} == set(unknown)
    assert "shortlist" in client.get("/openapi.json").json()["components"]["schemas"]["ClassifyResponse"][
        "properties"]


def test_concurrent_shortlists_are_scored_together_with_unchanged_answers(
        serve: Callable[[Settings], LiveService], tmp_path: Path) -> None:
    live = shortlisting(serve, tmp_path, size=3)
    texts = TEXTS * 2
    with live.client() as client:
        alone = [client.post("/v1/classify", json={"text": t, "top_k": 3}).json() for t in texts]
    together = classify_concurrently(live.url, [{"text": t, "top_k": 3} for t in texts], 6)
    batcher = live.service.batcher
    assert batcher.requests == 2 * len(texts) and batcher.batches < 2 * len(texts)  # some ran together
    for one, many in zip(alone, together, strict=True):
        assert one["shortlist"] == many["shortlist"] and one["label"] == many["label"]
        assert abs(one["confidence"] - many["confidence"]) < 1e-4  # type: ignore[operator]


def test_the_buffers_vote_is_weighed_into_the_answer(serve: Callable[[Settings], LiveService],
                                                     tmp_path: Path) -> None:
    live = shortlisting(serve, tmp_path, size=0, vote_weight=2.0)  # every label scored, the vote on
    client = live.client()
    runtime, buffer = live.service.runtime, live.service.buffer
    run, _ = runtime.resolve(LABELS)
    for text in TEXTS:
        answer = client.post("/v1/classify", json={"text": text, "top_k": 4}).json()
        model = LabelScorer(runtime.tokenizer, LABELS).score_batch(run.model, [text])
        [near] = buffer.neighbour_labels([text], 16)
        shares = vote_shares(near, LABELS, 16)
        assert shares and max(shares.values()) < 1  # the neighbours split their vote
        expected = torch.softmax(with_votes(model, torch.tensor([[shares.get(label, 0.0) for label in LABELS]]),
                                            2.0)[0], dim=0)
        got = {t["label"]: t["confidence"] for t in answer["top"]}
        assert torch.allclose(torch.tensor([got[label] for label in LABELS]), expected, atol=1e-4)
        # The vote moves the answer towards the neighbours' labels: the model alone ranks otherwise.
        alone = torch.softmax(model[0], dim=0)
        top_vote = max(shares, key=shares.__getitem__)
        assert got[top_vote] > float(alone[LABELS.index(top_vote)])
