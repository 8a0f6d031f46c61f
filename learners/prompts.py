"""Prompt formats: how a ticket becomes token ids, and which tokens the loss is taken on."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

IGNORE = -100  # label id that the causal-LM loss skips


def label_words(label: str) -> str:
    """Labels are scored as words, which the base model already has priors for.

    >>> label_words("card_arrival")
    'card arrival'
    """
    return label.replace("_", " ")


def classify_prompt(text: str) -> str:
    return f"Ticket: {text}\nIntent:"


def label_ids(tokenizer: PreTrainedTokenizerBase, label: str) -> list[int]:
    """The label's tokens plus end-of-sequence, so no label is a prefix of another."""
    ids: list[int] = tokenizer(" " + label_words(label), add_special_tokens=False).input_ids
    return [*ids, tokenizer.eos_token_id]


def prompt_ids(tokenizer: PreTrainedTokenizerBase, text: str, budget: int) -> list[int]:
    """Prompt tokens, the ticket text truncated from the end so the prompt fits `budget`."""
    ids: list[int] = tokenizer(classify_prompt(text), add_special_tokens=False).input_ids
    if len(ids) <= budget:
        return ids
    suffix: list[int] = tokenizer("\nIntent:", add_special_tokens=False).input_ids
    return ids[: budget - len(suffix)] + suffix


@dataclass(frozen=True)
class Example:
    """One training sequence; `labels` is IGNORE on the prompt so only the answer is learned."""

    input_ids: list[int]
    labels: list[int]


def classification_example(
    tokenizer: PreTrainedTokenizerBase, text: str, label: str, max_length: int
) -> Example:
    answer = label_ids(tokenizer, label)
    prompt = prompt_ids(tokenizer, text, max_length - len(answer))
    return Example(input_ids=prompt + answer, labels=[IGNORE] * len(prompt) + answer)
