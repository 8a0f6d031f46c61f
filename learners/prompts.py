"""Prompt formats: how a ticket becomes token ids, and which tokens the loss is taken on.

Two formats share one shape, `Ticket: <text>\\n<Cue>:` followed by the answer: classification
(cue `Intent`, answer the label as words) and reply generation (cue `Reply`, answer the
agent's reply). The loss covers the answer and the end-of-sequence token only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from streams.records import TicketRecord

IGNORE = -100  # label id that the causal-LM loss skips
INTENT_CUE = "\nIntent:"
REPLY_CUE = "\nReply:"
MIN_PROMPT_TOKENS = 16  # a reply never truncates its ticket below this many tokens


def label_words(label: str) -> str:
    """Labels are scored as words, which the base model already has priors for.

    >>> label_words("card_arrival")
    'card arrival'
    """
    return label.replace("_", " ")


def ticket_prompt(text: str, cue: str) -> str:
    """
    >>> ticket_prompt("My card is lost", REPLY_CUE)
    'Ticket: My card is lost\\nReply:'
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


def reply_example(tokenizer: PreTrainedTokenizerBase, text: str, reply: str, max_length: int) -> Example:
    """The reply's tokens plus end-of-sequence (so generation learns to stop) after the ticket.

    A long reply is cut at its end, keeping `MIN_PROMPT_TOKENS` for the ticket; the ticket then
    takes what is left, truncated like a classification prompt.
    """
    answer = [*tokenizer(" " + reply.strip(), add_special_tokens=False).input_ids, tokenizer.eos_token_id]
    answer = answer[: max(max_length - MIN_PROMPT_TOKENS, 1)]
    return _example(prompt_ids(tokenizer, text, max_length - len(answer), REPLY_CUE), answer)


def ticket_examples(tokenizer: PreTrainedTokenizerBase, records: Sequence[TicketRecord],
                    max_length: int) -> list[Example]:
    """Every example the records carry: one per label, one per reply."""
    examples = []
    for record in records:
        if record.label:
            examples.append(classification_example(tokenizer, record.text, record.label, max_length))
        if record.reply:
            examples.append(reply_example(tokenizer, record.text, record.reply, max_length))
    return examples
