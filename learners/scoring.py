"""Classification by label log-likelihood, with the prompt's key/value cache shared by all labels.

For each ticket the prompt runs through the model once; its cache is repeated across the
candidate labels, which then run as one batch. The cost is one prompt pass plus one short
batched pass, instead of a full prompt pass per label.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from learners.prompts import label_ids, prompt_ids


class LabelScorer:
    """Log-likelihood of each label's tokens after a ticket's prompt.

    Parameters
    ----------
    labels
        Canonical label strings (`card_arrival`); scored as words.
    max_prompt_tokens
        Prompts are truncated to this many tokens.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, labels: Sequence[str],
                 max_prompt_tokens: int = 256) -> None:
        if not labels:
            raise ValueError("no labels to score")
        self.tokenizer = tokenizer
        self.labels = list(labels)
        self.max_prompt_tokens = max_prompt_tokens
        encoded = [label_ids(tokenizer, label) for label in self.labels]
        width = max(len(ids) for ids in encoded)
        self._ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
        self._mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, ids in enumerate(encoded):
            self._ids[row, : len(ids)] = torch.tensor(ids)
            self._mask[row, : len(ids)] = 1

    def score(self, model: nn.Module, text: str) -> torch.Tensor:
        """Summed log-probability of every label (shape: labels); softmax of it is confidence."""
        return self.score_batch(model, [text])[0]

    @torch.inference_mode()
    def score_batch(self, model: nn.Module, texts: Sequence[str]) -> torch.Tensor:
        """`score` of several tickets in two batched passes (shape: texts × labels).

        Prompts are left-padded so every prompt ends at the same position; explicit position ids
        keep each prompt's positions as if it ran alone, as in training (see `collate`). On a CPU
        a small batch costs little more than one ticket: the weights are read once per pass, not
        once per ticket. Only logits that score a label token are computed: the vocabulary
        projection is a fifth of the model's work per token, and prompt positions, padding and
        each label's last token need none.
        """
        if not texts:
            return torch.zeros((0, len(self.labels)))
        prompts = [prompt_ids(self.tokenizer, text, self.max_prompt_tokens) for text in texts]
        b, n, width = len(prompts), len(self.labels), max(len(p) for p in prompts)
        ids = torch.full((b, width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((b, width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)[:, self._ids[:, 0]]  # b × n
        if self._ids.shape[1] == 1:
            return first  # every label is one token
        cache = out.cache
        # A prefix-tuning adapter put its virtual tokens in the cache ahead of the prompt. Given
        # that cache, PEFT's forward would prepend them a second time, so the label pass runs
        # on the base model and does what PEFT's forward does: attend to the virtual positions
        # and shift the position ids past them.
        virtual = cache.get_seq_length() - width
        runner = model.get_base_model() if virtual else model
        # Row r*n + j: ticket r, label j. Position t of this pass predicts label token t+1, so the
        # last column is never fed; right padding keeps the real positions.
        keep = self._mask[:, 1:].bool().repeat(b, 1)
        label_ids = self._ids.repeat(b, 1)
        cache.batch_repeat_interleave(n)
        attention = torch.cat([torch.ones((b * n, virtual), dtype=torch.long),
                               mask.repeat_interleave(n, dim=0), self._mask[:, :-1].repeat(b, 1)], dim=1)
        lengths = mask.sum(dim=1).repeat_interleave(n)
        label_positions = virtual + lengths[:, None] + torch.arange(label_ids.shape[1] - 1)[None, :]
        logits = runner(input_ids=label_ids[:, :-1], attention_mask=attention, position_ids=label_positions,
                        cache=cache, logits_to_keep=keep).logits  # one row per kept position
        logp = torch.log_softmax(logits.reshape(-1, logits.shape[-1]).float(), dim=-1)
        token_logp = logp.gather(-1, label_ids[:, 1:][keep][:, None])[:, 0]
        rest = torch.zeros(b * n).index_add_(0, keep.nonzero()[:, 0], token_logp)
        return first + rest.view(b, n)

    def score_many(self, model: nn.Module, texts: Sequence[str]) -> torch.Tensor:
        """Scores of several tickets (shape: texts × labels)."""
        if not texts:
            return torch.zeros((0, len(self.labels)))
        return torch.stack([self.score(model, text) for text in texts])
