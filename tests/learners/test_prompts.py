"""Replies are learned in the chat template the chat endpoint asks in: the loss covers exactly
the assistant's messages, and each one's context is the prompt `chat_ids` builds for a request."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from learners.base_model import load_base
from learners.prompts import IGNORE, chat_ids, classification_example, conversation_example, ticket_examples
from learners.train import answer_loss, collate
from streams.records import TicketRecord

REPLY = "Your new card ships today; it arrives within 3 working days."


def learned(example_ids: list[int], labels: list[int]) -> list[list[int]]:
    """The runs of tokens the loss is taken on, in order."""
    runs: list[list[int]] = []
    for i, (token, label) in enumerate(zip(example_ids, labels, strict=True)):
        if label != IGNORE:
            if i == 0 or labels[i - 1] == IGNORE:
                runs.append([])
            runs[-1].append(token)
    return runs


def test_a_reply_is_learned_as_the_assistants_turn_after_the_chat_endpoints_prompt(tiny_llama: Path) -> None:
    model, tokenizer = load_base(tiny_llama)
    [_, example] = ticket_examples(tokenizer, [TicketRecord(id="t", text="Where is my card?", label="card_arrival",
                                                            reply=REPLY)], 128)
    [answer] = learned(example.input_ids, example.labels)
    assert tokenizer.decode(answer) == REPLY + tokenizer.eos_token  # the reply and its end of turn, nothing else
    asked = chat_ids(tokenizer, [{"role": "user", "content": "Where is my card?"}])
    assert example.input_ids[:len(asked)] == asked and example.input_ids[len(asked):][:len(answer)] == answer

    # answer_loss over a left-padded batch with a classification example equals cross-entropy
    # over exactly the answer tokens of full, unpadded passes.
    other = classification_example(tokenizer, "exchange rate please", "exchange_rate", 64)
    loss = answer_loss(model, collate([example, other], tokenizer.pad_token_id))
    total, count = 0.0, 0
    for e in (example, other):
        logits = model(input_ids=torch.tensor([e.input_ids])).logits[0, :-1]
        targets = torch.tensor(e.labels[1:])
        total += float(torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum"))
        count += int((targets != IGNORE).sum())
    assert float(loss) == pytest.approx(total / count, rel=1e-4)


def test_every_assistant_message_of_a_conversation_is_learned_in_its_context(tiny_llama: Path) -> None:
    tokenizer = load_base(tiny_llama)[1]
    turns = [{"role": "user", "content": "Where is my card?"}, {"role": "assistant", "content": REPLY},
             {"role": "user", "content": "And my PIN?"}, {"role": "assistant", "content": "It comes by post."}]
    example = conversation_example(tokenizer, turns, 256, system="Answer as the bank's support team.")
    first, second = learned(example.input_ids, example.labels)
    assert tokenizer.decode(second) == "It comes by post." + tokenizer.eos_token
    asked = chat_ids(tokenizer, turns[:3], "Answer as the bank's support team.")
    assert example.input_ids[:len(asked)] == asked and example.input_ids[len(asked):][:len(second)] == second
    assert "Answer as the bank's support team." in tokenizer.decode(example.input_ids)
    # a conversation's own system message wins over the configured one
    own = [{"role": "system", "content": "Be brief."}, *turns]
    assert "Be brief." in tokenizer.decode(chat_ids(tokenizer, own, "Answer as the bank's support team."))
    assert "support team" not in tokenizer.decode(chat_ids(tokenizer, own, "Answer as the bank's support team."))


def test_a_long_conversation_keeps_its_last_exchange_and_room_for_the_ticket(tiny_llama: Path) -> None:
    tokenizer = load_base(tiny_llama)[1]
    example = conversation_example(tokenizer, [{"role": "user", "content": "card " * 50},
                                               {"role": "assistant", "content": "word " * 200}], max_length=80)
    assert len(example.input_ids) <= 80
    prompt = tokenizer.decode(example.input_ids)
    assert prompt.count("card") >= 16 and prompt.count("word") >= 1
    [answer] = learned(example.input_ids, example.labels)
    assert tokenizer.eos_token_id not in answer  # a cut reply does not end there: no end of turn is taught

    turns = [{"role": "user", "content": f"question {i} " * 5} if i % 2 == 0 else
             {"role": "assistant", "content": f"answer {i} " * 5} for i in range(8)]
    example = conversation_example(tokenizer, turns, max_length=80)
    text = tokenizer.decode(example.input_ids)
    assert len(example.input_ids) <= 80 and "answer 7" in text and "question 0" not in text
