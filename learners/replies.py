"""How well a version still replies: its answer loss and greedy answers on reply probes.

A probe that carries a conversation (`TicketRecord.conversation`) is a reply probe too. The
gate scores the earlier windows' reply probes (a bounded, stratified share, `reply_probes`) with
the candidate and the live version alike, in the format training and the chat endpoint use
(`learners.prompts`): the mean loss of the reference reply's tokens on every probe, and on a few
(`gate.reply_generations`) the greedy answer's ROUGE-L F1 against the reference, since a
candidate can keep its loss yet answer worse. `learners.gate.judge` compares them probe by probe.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from itertools import zip_longest
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from learners.config import TrainSettings
from learners.placement import device_of
from learners.probes import budgeted_probes
from learners.prompts import chat_ids, conversation_example
from learners.reports import ReplyScore
from learners.score_cache import ReplyCell
from learners.train import answer_loss, collate
from streams.records import TicketRecord

if TYPE_CHECKING:
    from rouge_score.rouge_scorer import RougeScorer

MATCH_ROUGE = 0.8  # an answer this close to the reference is the reference, reworded at most


def reply_probes(probes: Mapping[int, Sequence[TicketRecord]], new_windows: Sequence[int],
                 budget: int) -> dict[int, list[TicketRecord]]:
    """The earlier windows' probes that carry a conversation, at most `budget` of them, spread
    over the windows and their labels as `budgeted_probes` spreads label probes.

    >>> rows = [TicketRecord(id=str(i), text="t", label="a", reply="r" if i % 2 else None) for i in range(6)]
    >>> {w: [r.id for r in p] for w, p in reply_probes({1: rows, 2: rows}, [2], 10).items()}
    {1: ['1', '3', '5']}
    """
    if not budget:
        return {}
    conversations = {w: [r for r in rows if r.conversation() is not None]
                     for w, rows in probes.items() if w not in new_windows}
    return {w: rows for w, rows in budgeted_probes(conversations, [], budget).items() if rows}


def rouge_l(answer: str, reference: str) -> float:
    """ROUGE-L F1 of an answer against the reference (`rouge-score`, words lower-cased).

    >>> round(rouge_l("Your card ships today", "your card is shipped today"), 3)
    0.667
    """
    return float(_rouge_scorer().score(reference, answer)["rougeL"].fmeasure)


@functools.cache
def _rouge_scorer() -> RougeScorer:
    # Imported on first use: rouge-score imports nltk (1.1 s here), which every training process and
    # the server would otherwise pay at start though most streams carry no replies.
    from rouge_score.rouge_scorer import RougeScorer

    return RougeScorer(["rougeL"])


def greedy_reply(model: nn.Module, tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, str]],
                 system: str | None, max_tokens: int) -> str:
    """The model's greedy answer to a conversation, as the chat endpoint would give it."""
    prompt = torch.tensor([chat_ids(tokenizer, messages, system)], device=device_of(model))
    out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_tokens,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return str(tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True)).strip()


def reply_conditions(cfg: TrainSettings, max_tokens: int) -> str:
    """What a version's reply figures depend on besides its weights and the probe (the prompt's
    system message and cut, the answer's length): figures cached under other conditions are not reused.

    >>> reply_conditions(TrainSettings(), 96) == reply_conditions(TrainSettings(system_prompt="Be brief."), 96)
    False
    """
    return json.dumps([cfg.system_prompt, cfg.max_length, max_tokens])


def score_replies(model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                  probes: Mapping[int, Sequence[TicketRecord]], cfg: TrainSettings, generations: int,
                  max_tokens: int, cached: Mapping[str, ReplyCell] | None = None,
                  ) -> tuple[dict[int, ReplyScore], dict[str, ReplyCell]]:
    """Each window's reply probes: every probe's answer loss, and the greedy answers of the first
    `generations` probes taken one window after another (so every window gets its turn).

    A figure found in `cached` (this version's own, from when it was the candidate, under the same
    `reply_conditions`) is taken from there, not from the model: a probe's conversation is fixed by
    its id, a version's weights once published, and greedy answers are deterministic. The second
    value holds every probe's figures, for the version's cache.
    """
    rounds = zip_longest(*[[(w, r.id) for r in rows] for w, rows in sorted(probes.items())])
    answered = set([pair for turn in rounds for pair in turn if pair is not None][:generations])
    cached = cached or {}
    scores, cells = {}, {}
    with torch.no_grad():
        for window, rows in sorted(probes.items()):
            losses, rouges, reused = [], [], 0
            for record in rows:
                turns, have = record.conversation() or [], cached.get(record.id)
                if have is not None:
                    loss, reused = have.loss, reused + 1
                else:
                    example = conversation_example(tokenizer, turns, cfg.max_length, cfg.system_prompt)
                    loss = float(answer_loss(model, collate([example], tokenizer.pad_token_id)))
                rouge = have.rouge_l if have is not None else None
                if (window, record.id) in answered:
                    if rouge is None:
                        rouge = rouge_l(greedy_reply(model, tokenizer, turns[:-1], cfg.system_prompt, max_tokens),
                                        turns[-1]["content"])
                    else:
                        reused += 1
                    rouges.append(rouge)
                losses.append(loss)
                cells[record.id] = ReplyCell(loss=loss, rouge_l=rouge)
            scores[window] = ReplyScore(
                n=len(losses), loss=sum(losses) / len(losses), answered=len(rouges),
                rouge_l=sum(rouges) / len(rouges) if rouges else None,
                matched=sum(r >= MATCH_ROUGE for r in rouges) / len(rouges) if rouges else None,
                losses=tuple(losses), rouges=tuple(rouges), reused=reused)
    return scores, cells
