"""Turns at the model: a long answer steps aside for waiting requests and answers the same."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import torch

from service.settings import ServingSettings, Settings
from service.turns import TurnLock
from tests.conftest import LiveService, gauge, tiny_settings, wait_for

LABELS = ["card arrival", "exchange rate", "top up failed", "lost or stolen card"]
# Over a thousand prompt tokens: the prefill takes turns (`serving.turn_tokens`).
LONG_PROMPT = " ".join(f"ticket {i}: my card has not arrived and the exchange rate looks wrong." for i in range(90))


def test_turns_are_granted_in_order_of_arrival_and_the_holder_can_step_aside() -> None:
    turns, order = TurnLock(), []

    def take(name: str) -> None:
        with turns:
            order.append(name)

    turns.acquire()
    waiters = []
    for i, name in enumerate(["a", "b", "c"]):
        waiters.append(threading.Thread(target=take, args=(name,)))
        waiters[-1].start()
        wait_for(lambda n=i + 1: turns.waiting == n, 10, f"{name} to queue")
    assert not turns.step_aside(after_s=60) and order == []  # the turn has not lasted a minute
    assert turns.step_aside() and order == ["a", "b", "c"]  # all who waited went first
    assert not turns.step_aside()
    turns.release()
    for waiter in waiters:
        waiter.join(timeout=10)


def chat(live: LiveService, content: str, **sampling: object) -> dict[str, object]:
    with httpx.Client(base_url=live.url, timeout=120) as http:
        answer = http.post("/v1/chat/completions", json={"model": "live", "messages": [
            {"role": "user", "content": content}], **sampling})
        answer.raise_for_status()
        return answer.json()  # type: ignore[no-any-return]


def test_a_small_classify_waits_for_one_step_of_a_long_answer_not_all_of_it(
        serve: Callable[[Settings], LiveService], tmp_path: Path) -> None:
    """Issue 13: a small request waited 30 s behind a large one. A chat answer held the model for
    its whole generation, prefill included. (Turns of 50 ms: the tiny model's whole answer takes one second.)"""
    live = serve(tiny_settings(tmp_path, None, serving=ServingSettings(turn_ms=50)))
    runtime = live.service.runtime
    prompt = runtime.tokenizer(LONG_PROMPT)["input_ids"]
    assert len(prompt) > 1000
    long_answer = {"max_tokens": 256, "temperature": 0}
    alone = chat(live, LONG_PROMPT, **long_answer)
    assert alone["usage"]["completion_tokens"] == 256  # type: ignore[index]  # premise: it runs to its end

    # The chunked prefill changes nothing: the same greedy tokens as one `generate` over the prompt.
    ids = torch.tensor([runtime.tokenizer.apply_chat_template(
        [{"role": "user", "content": LONG_PROMPT}], add_generation_prompt=True, tokenize=True)["input_ids"]])
    with torch.inference_mode():
        raw = runtime.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=256,
                                     do_sample=False, pad_token_id=runtime.tokenizer.pad_token_id)
    assert alone["choices"][0]["message"]["content"] == runtime.tokenizer.decode(  # type: ignore[index]
        raw[0, ids.shape[1]:], skip_special_tokens=True)

    finished: dict[str, float] = {}
    with httpx.Client(base_url=live.url, timeout=120) as http:
        with http.stream("POST", "/v1/chat/completions", json={"model": "live", "stream": True, "messages": [
                {"role": "user", "content": LONG_PROMPT}], **long_answer}) as stream:
            lines = stream.iter_lines()
            next(line for line in lines if line.startswith("data: "))  # generating now

            def small() -> None:
                with httpx.Client(base_url=live.url, timeout=120) as other:
                    assert other.post("/v1/classify", json={"text": "card", "labels": LABELS}).status_code == 200
                finished["small"] = time.monotonic()

            asker = threading.Thread(target=small)
            asked = time.monotonic()
            asker.start()
            for _ in lines:
                pass
        finished["long"] = time.monotonic()
    asker.join(timeout=60)
    waited, rest = finished["small"] - asked, finished["long"] - asked
    assert waited < rest / 2, (waited, rest)  # before: it waited for the whole answer


def steps_aside(live: LiveService) -> float:
    return gauge(live.client().get("/metrics").text, "evergreen_model_steps_aside_total") or 0.0


def test_seeded_answers_are_the_same_when_they_take_turns(serve: Callable[[Settings], LiveService],
                                                          tmp_path: Path) -> None:
    live = serve(tiny_settings(tmp_path, None, serving=ServingSettings(turn_ms=0)))  # a turn per token
    seeded = [dict(max_tokens=48, temperature=1.0, seed=seed) for seed in (3, 4)]
    alone = [chat(live, "hello there", **s)["choices"][0]["message"]["content"] for s in seeded]  # type: ignore[index]
    assert alone[0] != alone[1]  # premise: the seeds lead to different answers
    together: list[str] = ["", ""]

    def ask(i: int) -> None:
        together[i] = chat(live, "hello there", **seeded[i])["choices"][0]["message"]["content"]  # type: ignore[index]

    before = steps_aside(live)
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert steps_aside(live) - before > 10  # premise: they took turns, token by token
    assert together == alone, json.dumps([together, alone])
