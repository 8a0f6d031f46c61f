"""Prompt formats: how a ticket becomes token ids, and which tokens the loss is taken on.

Classification is `Ticket: <text>\\nIntent:` followed by the label as words. Replies are a
conversation in the base model's own chat template, the ticket as the user's message and the
reply as the assistant's (`TicketRecord.conversation`), so `/v1/chat/completions`, which builds
its prompt with `chat_ids`, asks exactly what training taught. The loss covers the answers (the
label and its end-of-sequence token; each assistant message and its end of turn) only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from streams.records import TicketRecord

IGNORE = -100  # label id that the causal-LM loss skips
INTENT_CUE = "\nIntent:"
MIN_PROMPT_TOKENS = 16  # a reply never truncates its ticket below this many tokens


def label_words(label: str) -> str:
    """Labels are scored as words, which the base model already has priors for.

    >>> label_words("card_arrival")
    'card arrival'
    """
    return label.replace("_", " ")


def ticket_prompt(text: str, cue: str) -> str:
    """
    >>> ticket_prompt("My card is lost", INTENT_CUE)
    'Ticket: My card is lost\\nIntent:'
    """
    return f"Ticket: {text}{cue}"


def label_ids(tokenizer: PreTrainedTokenizerBase, label: str) -> list[int]:
    """The label's tokens plus end-of-sequence, so no label is a prefix of another."""
    ids: list[int] = tokenizer(" " + label_words(label), add_special_tokens=False).input_ids
    return [*ids, tokenizer.eos_token_id]


def prompt_ids(tokenizer: PreTrainedTokenizerBase, text: str, budget: int, cue: str = INTENT_CUE) -> list[int]:
    """Prompt tokens, the ticket text truncated from the end so the prompt fits `budget`."""
    ids: list[int] = tokenizer(ticket_prompt(text, cue), add_special_tokens=False).input_ids
    if len(ids) <= budget:
        return ids
    suffix: list[int] = tokenizer(cue, add_special_tokens=False).input_ids
    return ids[: budget - len(suffix)] + suffix


@dataclass(frozen=True)
class Example:
    """One training sequence; `labels` is IGNORE on the prompt so only the answer is learned."""

    input_ids: list[int]
    labels: list[int]
    intent: str | None = None  # the class label of a classification example; None for a reply


def _example(prompt: list[int], answer: list[int], intent: str | None = None) -> Example:
    return Example(input_ids=prompt + answer, labels=[IGNORE] * len(prompt) + answer, intent=intent)


def classification_example(
    tokenizer: PreTrainedTokenizerBase, text: str, label: str, max_length: int
) -> Example:
    answer = label_ids(tokenizer, label)
    return _example(prompt_ids(tokenizer, text, max_length - len(answer)), answer, label)


def with_system(messages: Sequence[Mapping[str, str]], system: str | None) -> list[dict[str, str]]:
    """The conversation as the model sees it: `system` first, unless it has a system message of
    its own (None: the chat template's default, if it has one).

    >>> with_system([{"role": "user", "content": "hi"}], "Be brief.")
    [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'hi'}]
    """
    turns = [dict(m) for m in messages]
    if system is None or (turns and turns[0]["role"] == "system"):
        return turns
    return [{"role": "system", "content": system}, *turns]


def _render(tokenizer: PreTrainedTokenizerBase, turns: list[dict[str, str]], generation: bool) -> str:
    text: str = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation)
    return text


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    ids: list[int] = tokenizer(text, add_special_tokens=False).input_ids
    return ids


def chat_ids(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, str]],
             system: str | None = None) -> list[int]:
    """Token ids of a conversation in the chat template, ready for the assistant's turn: what the
    chat endpoint generates from, and each assistant message's context in training."""
    return _ids(tokenizer, _render(tokenizer, with_system(messages, system), generation=True))


def _conversation(tokenizer: PreTrainedTokenizerBase, turns: list[dict[str, str]]) -> Example:
    input_ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        before, after = _render(tokenizer, turns[:i], True), _render(tokenizer, turns[: i + 1], False)
        if not (before.startswith(rendered) and after.startswith(before)):
            raise ValueError("the chat template does not render a conversation turn by turn")
        context, answer = _ids(tokenizer, before[len(rendered):]), _ids(tokenizer, after[len(before):])
        end = answer.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in answer else len(answer)
        input_ids += context + answer
        labels += [IGNORE] * len(context) + answer[:end] + [IGNORE] * (len(answer) - end)
        rendered = after
    return Example(input_ids=input_ids, labels=labels)


def _clip(tokenizer: PreTrainedTokenizerBase, text: str, tokens: int) -> str:
    return str(tokenizer.decode(_ids(tokenizer, text)[: max(tokens, 1)]))


def conversation_example(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, str]],
                         max_length: int, system: str | None = None) -> Example:
    """Every assistant message learned, with its end of turn (so generation learns to stop), in
    the context of what came before it, rendered as `chat_ids` renders a request.

    Past `max_length` the oldest exchanges go first; a single exchange still too long has its
    reply cut at its end (and then its end of turn is not learned: the reply does not end there),
    keeping `MIN_PROMPT_TOKENS` for the ticket, which then takes what is left, cut at its end.
    """
    turns = with_system(messages, system)
    head = 1 if turns[0]["role"] == "system" else 0
    example = _conversation(tokenizer, turns)
    while len(example.input_ids) > max_length and len(turns) - head > 2:
        turns = turns[:head] + turns[head + 2:]
        example = _conversation(tokenizer, turns)
    if len(example.input_ids) > max_length:
        user, reply = turns[-2]["content"], turns[-1]["content"]
        ticket_tokens, reply_tokens = len(_ids(tokenizer, user)), len(_ids(tokenizer, reply))
        overhead = len(example.input_ids) - ticket_tokens - reply_tokens
        reply_budget = max_length - overhead - min(ticket_tokens, MIN_PROMPT_TOKENS)
        reply = _clip(tokenizer, reply, reply_budget)
        user = _clip(tokenizer, user, max_length - overhead - len(_ids(tokenizer, reply)))
        turns = [*turns[:-2], {"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        example = _conversation(tokenizer, turns)
        if reply_tokens > reply_budget:  # a cut reply does not end there: its end of turn is not taught
            last = max(i for i, label in enumerate(example.labels) if label == tokenizer.eos_token_id)
            example.labels[last] = IGNORE
    return Example(input_ids=example.input_ids[:max_length], labels=example.labels[:max_length])


def ticket_examples(tokenizer: PreTrainedTokenizerBase, records: Sequence[TicketRecord],
                    max_length: int, system: str | None = None) -> list[Example]:
    """Every example the records carry: one per label, one per conversation (a `reply` or
    `messages`), under the system prompt `system` (None: the chat template's default)."""
    examples = []
    for record in records:
        if record.label:
            examples.append(classification_example(tokenizer, record.text, record.label, max_length))
        if (conversation := record.conversation()) is not None:
            examples.append(conversation_example(tokenizer, conversation, max_length, system))
    return examples


def examples_by_ticket(tokenizer: PreTrainedTokenizerBase, records: Sequence[TicketRecord],
                       max_length: int, system: str | None = None) -> list[list[Example]]:
    """`ticket_examples` kept apart ticket by ticket: the unit a private round clips
    (`learners.privacy`); a ticket without examples is still one."""
    return [ticket_examples(tokenizer, [record], max_length, system) for record in records]
