"""Classification by label log-likelihood: a ticket and all its candidate labels in one packed row.

The candidate labels share their first tokens ("card arrival", "card delivery estimate", ...),
so they are stored as a token trie, which runs in the same row as the ticket's prompt: every
trie node attends to the prompt and to its own ancestors, nothing else (a 4-D attention mask).
Each label's tokens thus see exactly what a full pass over prompt + label would show them, while
the prompt runs once per ticket and a shared label prefix once per ticket, not once per label.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from peft import PeftType
from torch import nn
from transformers import DynamicCache, PreTrainedTokenizerBase

from learners.placement import device_of
from learners.prompts import label_ids, prompt_ids


class LabelTrie:
    """The labels' token sequences as a prefix tree, in the tensors a packed pass needs.

    Node i is a label prefix of length `depth[i]` ending in token `tokens[i]`. Every label token
    is predicted from a source: source 0 is the prompt's last position, source 1 + i is node i.

    >>> trie = LabelTrie([[5, 7, 2], [5, 8, 2], [9, 2]])
    >>> trie.tokens.tolist(), trie.depth.tolist()  # 5, 5-7, 5-8 and 9: "5" is stored once
    ([5, 7, 8, 9], [1, 2, 2, 1])
    >>> trie.sources.tolist(), trie.targets.tolist(), trie.owners.tolist()
    ([0, 1, 2, 0, 1, 3, 0, 4], [5, 7, 2, 5, 8, 2, 9, 2], [0, 0, 0, 1, 1, 1, 2, 2])
    """

    def __init__(self, sequences: Sequence[Sequence[int]]) -> None:
        nodes: dict[tuple[int, ...], int] = {}
        parents: list[int] = []
        sources: list[int] = []
        targets: list[int] = []
        owners: list[int] = []
        for owner, ids in enumerate(sequences):
            source = 0
            for end, token in enumerate(ids):
                sources.append(source)
                targets.append(token)
                owners.append(owner)
                if end == len(ids) - 1:
                    break  # the last token is only predicted, never fed
                prefix = tuple(ids[: end + 1])
                if prefix not in nodes:
                    nodes[prefix] = len(nodes)
                    parents.append(source - 1)
                source = 1 + nodes[prefix]
        self.tokens = torch.tensor([prefix[-1] for prefix in nodes], dtype=torch.long)
        self.depth = torch.tensor([len(prefix) for prefix in nodes], dtype=torch.long)
        self.sources = torch.tensor(sources, dtype=torch.long)
        self.targets = torch.tensor(targets, dtype=torch.long)
        self.owners = torch.tensor(owners, dtype=torch.long)
        # sees[i, j]: node i attends to node j, i.e. j is i itself or one of its ancestors
        self.sees = torch.eye(len(nodes), dtype=torch.bool)
        for node, parent in enumerate(parents):  # parents come before their children
            if parent >= 0:
                self.sees[node] |= self.sees[parent]
        self._placed: dict[torch.device, LabelTrie] = {}

    def on(self, device: torch.device) -> LabelTrie:
        """This trie with its tensors on `device`, copied there once and kept (a served label
        set is scored on the device again and again)."""
        if device.type == "cpu":
            return self
        if device not in self._placed:
            placed = copy.copy(self)
            for name in ("tokens", "depth", "sources", "targets", "owners", "sees"):
                setattr(placed, name, getattr(self, name).to(device))
            self._placed[device] = placed
        return self._placed[device]


class LabelScorer:
    """Log-likelihood of each label's tokens after a ticket's prompt.

    Parameters
    ----------
    labels
        Canonical label strings (`card_arrival`); scored as words.
    max_prompt_tokens
        Prompts are truncated to this many tokens.
    ids
        Each label's token ids (`label_ids`), when the caller holds them already: building a
        scorer then costs no tokenizer call.
    """

    MAX_PROMPT_TOKENS = 256

    def __init__(self, tokenizer: PreTrainedTokenizerBase, labels: Sequence[str],
                 max_prompt_tokens: int = MAX_PROMPT_TOKENS, *, ids: Sequence[Sequence[int]] | None = None) -> None:
        if not labels:
            raise ValueError("no labels to score")
        self.tokenizer = tokenizer
        self.labels = list(labels)
        self._index = {label: i for i, label in enumerate(self.labels)}
        self.max_prompt_tokens = max_prompt_tokens
        self.label_ids = ([list(i) for i in ids] if ids is not None
                          else [label_ids(tokenizer, label) for label in self.labels])
        self.trie = LabelTrie(self.label_ids)

    def subset(self, labels: Sequence[str]) -> LabelScorer:
        """A scorer of some of these labels (a shortlist), built from their known token ids.

        A label's tokens attend to the prompt and their own prefix only, never to another label,
        so its score is exactly the one this scorer gives it: only the cost shrinks.
        """
        return LabelScorer(self.tokenizer, labels, self.max_prompt_tokens,
                           ids=[self.label_ids[self._index[label]] for label in labels])

    def score(self, model: nn.Module, text: str) -> torch.Tensor:
        """Summed log-probability of every label (shape: labels); softmax of it is confidence."""
        return self.score_batch(model, [text])[0]

    def score_batch(self, model: nn.Module, texts: Sequence[str]) -> torch.Tensor:
        """`score` of several tickets in one batched pass (shape: texts × labels). On a CPU a
        small batch costs little more than one ticket: the weights are read once per pass."""
        if not texts:
            return torch.zeros((0, len(self.labels)))
        return self.score_after(PromptPass(model, self.tokenizer, texts, self.max_prompt_tokens))

    @torch.inference_mode()
    def score_after(self, prompts: PromptPass) -> torch.Tensor:
        """Every label's log-likelihood after each of `prompts` (shape: texts × labels), in one
        pass that also reads what is left of the prompts.

        The trie's nodes run in the same row after the prompt (or after its cached keys and
        values): every node attends to its prompt and its ancestors. Logits are computed only
        where they score a label token: the prompt's last position and the trie's nodes. The
        nodes are cut from the cache afterwards, so the same prompts can be scored against the
        next label chunk. The scores come back to the host: they are read there.
        """
        trie, b = self.trie.on(prompts.ids.device), prompts.rows
        logp = prompts.run_nodes(trie.tokens.expand(b, -1), trie.depth.expand(b, -1), trie.sees.expand(b, -1, -1))
        token_logp = logp[:, trie.sources, trie.targets]  # b × label tokens
        return torch.zeros((b, len(self.labels)), device=logp.device).index_add_(1, trie.owners, token_logp).cpu()

    def score_many(self, model: nn.Module, texts: Sequence[str], batch: int = 8) -> torch.Tensor:
        """Scores of any number of tickets (shape: texts × labels), `batch` tickets per pass."""
        if not texts:
            return torch.zeros((0, len(self.labels)))
        return torch.cat([self.score_batch(model, texts[i: i + batch]) for i in range(0, len(texts), batch)])

    def judged_among(self, shortlist: Sequence[str]) -> list[str]:
        """The labels a ticket with `shortlist` is scored among: those of it the scorer has, or,
        if none (an empty shortlist), every label."""
        return [label for label in shortlist if label in self._index] or list(self.labels)

    def score_among(self, model: nn.Module, texts: Sequence[str], shortlists: Sequence[Sequence[str]],
                    batch: int = 8) -> torch.Tensor:
        """`score_many` with each ticket's labels restricted to its shortlist (an empty one: every
        label); the labels left out score -inf, the others exactly what `score_many` gives them.

        Each ticket's row carries the trie of its own labels only (padded to the batch's largest),
        not the union of the batch's shortlists: on a CPU a pass costs about its tokens, and 8
        tickets' 12-label shortlists of 77 close intents unite to some 45 labels. Tickets are
        batched by how many labels they are judged among, so the padding stays small.
        """
        own = [self.judged_among(short) for short in shortlists]
        scores = torch.full((len(texts), len(self.labels)), -math.inf)
        order = sorted(range(len(texts)), key=lambda i: (len(own[i]), self._index[own[i][0]]))
        for start in range(0, len(order), batch):
            rows = order[start: start + batch]
            tries = [LabelTrie([self.label_ids[self._index[label]] for label in own[i]]) for i in rows]
            nodes = max(len(trie.tokens) for trie in tries)
            tokens = torch.zeros((len(rows), nodes), dtype=torch.long)
            depth = torch.ones((len(rows), nodes), dtype=torch.long)
            sees = torch.eye(nodes, dtype=torch.bool).repeat(len(rows), 1, 1)  # a padding node sees itself
            for at, trie in enumerate(tries):
                n = len(trie.tokens)
                tokens[at, :n], depth[at, :n], sees[at, :n, :n] = trie.tokens, trie.depth, trie.sees
            prompts = PromptPass(model, self.tokenizer, [texts[i] for i in rows], self.max_prompt_tokens)
            device = prompts.ids.device
            with torch.inference_mode():
                logp = prompts.run_nodes(tokens.to(device), depth.to(device), sees.to(device)).cpu()
            for at, (i, trie) in enumerate(zip(rows, tries, strict=True)):
                own_scores = torch.zeros(len(own[i])).index_add_(0, trie.owners, logp[at, trie.sources, trie.targets])
                scores[i, [self._index[label] for label in own[i]]] = own_scores
        return scores


class PromptPass:
    """Tickets' prompts read by a model, scored against any number of label sets in turn
    (`LabelScorer.score_after`, which reads what is left of them in the same pass): a request
    with many labels reads its ticket once, a long ticket a few columns per turn (`advance`), and
    no step holds the model long (`service.batching`).

    Row r is ticket r's prompt, left-padded so every prompt ends at the same column. Explicit
    position ids keep each prompt's positions as if it ran alone, as in training (see `collate`).
    """

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
                 max_prompt_tokens: int = LabelScorer.MAX_PROMPT_TOKENS) -> None:
        prompts = [prompt_ids(tokenizer, text, max_prompt_tokens) for text in texts]
        self.rows, self.width = len(prompts), max(len(p) for p in prompts)
        self.ids = torch.full((self.rows, self.width), tokenizer.pad_token_id, dtype=torch.long)
        self.real = torch.zeros((self.rows, self.width), dtype=torch.bool)
        for row, prompt in enumerate(prompts):
            self.ids[row, self.width - len(prompt):] = torch.tensor(prompt)
            self.real[row, self.width - len(prompt):] = True
        device = device_of(model)
        self.ids, self.real = self.ids.to(device), self.real.to(device)
        cache, self.virtual, self.runner = _virtual_tokens(model, self.rows)
        self.cache = cache if cache is not None else DynamicCache(config=self.runner.config)
        self.lengths = self.real.sum(dim=1, keepdim=True)
        self.positions = self.virtual + (self.real.cumsum(dim=1) - 1).clamp(min=0)
        self.read = 0  # columns run so far
        self.end_logp = torch.empty(0)  # log-probabilities after each prompt's last token, once read

    @property
    def ready(self) -> bool:
        return self.read == self.width

    @property
    def unread(self) -> int:
        """Prompt tokens (over all rows) not read yet."""
        return (self.width - self.read) * self.rows

    def sees(self, start: int, end: int) -> torch.Tensor:
        """Whom prompt columns start..end attend to (rows × queries × virtual + `end` keys): every
        virtual token, and their own prompt causally; a padding position sees only itself, so
        that no row of the softmax is empty."""
        device = self.real.device
        keys = torch.arange(end, device=device)
        queries = torch.arange(start, end, device=device)[:, None]
        own = ((keys <= queries) & self.real[:, None, :end]) | (keys == queries)
        return torch.cat([torch.ones((self.rows, end - start, self.virtual), dtype=torch.bool, device=device), own],
                         dim=2)

    @torch.inference_mode()
    def advance(self, tokens: int) -> None:
        """Read the next columns, about `tokens` prompt tokens over all rows (at least one column)."""
        start = self.read
        end = min(self.width, start + max(1, tokens // self.rows))
        logits = self.runner(input_ids=self.ids[:, start:end], attention_mask=self.sees(start, end)[:, None],
                             position_ids=self.positions[:, start:end], cache=self.cache, logits_to_keep=1).logits
        self.read = end
        if self.ready:
            self.end_logp = logits[:, -1].float().log_softmax(dim=-1)

    def run_nodes(self, tokens: torch.Tensor, depth: torch.Tensor, sees: torch.Tensor) -> torch.Tensor:
        """Run label-trie nodes after each row's prompt, reading what is left of the prompts in the
        same pass: row r's node i is token `tokens[r, i]` at label depth `depth[r, i]` and attends
        to its prompt and to the nodes `sees[r, i]`. Returns log-probabilities (rows × 1 + nodes ×
        vocabulary): after the prompt's last token, then after each node. The nodes are cut from
        the cache afterwards, so the same prompts can be run with other nodes next."""
        device, b, start, width, nodes = self.ids.device, self.rows, self.read, self.width, tokens.shape[1]
        prompt_rows = torch.cat([self.sees(start, width),
                                 torch.zeros((b, width - start, nodes), dtype=torch.bool, device=device)], dim=2)
        node_rows = torch.cat([torch.ones((b, nodes, self.virtual), dtype=torch.bool, device=device),
                               self.real[:, None, :].expand(b, nodes, width), sees], dim=2)
        logits = self.runner(
            input_ids=torch.cat([self.ids[:, start:], tokens], dim=1),
            attention_mask=torch.cat([prompt_rows, node_rows], dim=1)[:, None],
            position_ids=torch.cat([self.positions[:, start:], self.virtual + self.lengths + depth - 1], dim=1),
            cache=self.cache, logits_to_keep=nodes + 1).logits  # the prompt's end (if read now), then nodes
        self.cache.crop(-nodes)
        if not self.ready:
            self.read, self.end_logp = width, logits[:, 0].float().log_softmax(dim=-1)
        return torch.cat([self.end_logp[:, None], logits[:, -nodes:].float().log_softmax(dim=-1)], dim=1)


VOTE_FLOOR = 0.01  # a label no neighbour votes for is held back, not ruled out


def with_votes(scores: torch.Tensor, shares: torch.Tensor, weight: float) -> torch.Tensor:
    """The answer's scores: each ticket's log-probability of a label among those scored (finite
    `scores`), plus `weight` × log(the label's vote share + `VOTE_FLOOR`) from the buffer's
    nearest neighbours (`replay.shortlist.vote_shares`; shape: tickets × labels, 0 where none).

    A product of two experts: the model, which leans towards the labels it was trained on last,
    and the buffer's memory, which holds every window's tickets alike. A ticket without votes is
    ranked by the model alone; an unscored label stays -inf.

    >>> scores = torch.tensor([[-1.0, -1.2, -math.inf], [-1.0, -1.2, -3.0]])
    >>> shares = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    >>> with_votes(scores, shares, 2.0).argmax(dim=1).tolist()  # the vote turns the first ticket only
    [1, 0]
    """
    logp = torch.log_softmax(scores, dim=1)
    if weight == 0:
        return logp
    return logp + weight * torch.log(shares + VOTE_FLOOR)


def _virtual_tokens(model: nn.Module, batch: int) -> tuple[object, int, nn.Module]:
    """(cache, count, model to run) for a prefix-tuning adapter's virtual tokens.

    PEFT's own forward would build a 2-D mask for them; the packed pass needs its 4-D one, so it
    runs the base model on PEFT's virtual key/value cache, as PEFT's forward does underneath.
    Any other model, or one whose adapter is disabled, runs as it is, without a cache.
    """
    config = getattr(model, "active_peft_config", None)
    if config is None or config.peft_type != PeftType.PREFIX_TUNING or model._adapters_disabled:
        return None, 0, model
    return model.get_prompt(batch_size=batch), config.num_virtual_tokens, model.get_base_model()
