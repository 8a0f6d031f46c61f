"""Text generation on the serving runtime: prompts, sampling, stop strings, token streaming.

One code path serves plain and streaming answers: a worker thread pins a version (so the whole
answer comes from the version it started on), runs `model.generate`, and hands text deltas to
the caller through a queue. Text that could still become a stop string is held back until it
cannot, so neither mode ever shows a stop string. A long answer does not hold the model: it steps
aside for waiting requests after each chunk of a long prompt, and between tokens once its turn
has lasted `serving.turn_ms` (`service.turns`).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers import DynamicCache, PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from service.runtime import LIVE, ModelRuntime

LOG = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]


class PromptTooLong(Exception):
    """The prompt has more tokens than `serving.max_prompt_tokens`."""


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int = 0
    finish_reason: FinishReason = "length"


def text_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    ids: list[int] = tokenizer(prompt, add_special_tokens=False).input_ids
    return ids


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that begins some stop string (may still complete)."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if stop.startswith(text[-n:]):
                longest = n
                break
    return longest


@dataclass
class _Decoder(BaseStreamer):  # type: ignore[misc]
    """Receives token ids from `generate`, turns them into safe text deltas on a queue."""

    tokenizer: PreTrainedTokenizerBase
    stops: tuple[str, ...]
    out: queue.Queue[tuple[str, Any]]
    cancel: threading.Event
    usage: Usage
    ids: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the decoded text already handed out
    prompt_seen: bool = False
    stopped: bool = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate's first call carries the prompt
            self.prompt_seen = True
            return
        if self.stopped:
            return
        self.ids.extend(value.reshape(-1).tolist())
        self.usage.completion_tokens = len(self.ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return  # half of a multi-byte character: wait for the rest
        hit = min((i for i in (text.find(s, max(0, self.sent - len(s))) for s in self.stops) if i >= 0),
                  default=-1)
        if hit >= 0:
            self.stopped, self.usage.finish_reason = True, "stop"
            self._send(text[:hit])
            return
        self._send(text[: len(text) - _held_back(text, self.stops)])

    def _send(self, text: str) -> None:
        if len(text) > self.sent:
            self.out.put(("text", text[self.sent:]))
            self.sent = len(text)

    def end(self) -> None:
        if not self.stopped:
            self._send(self.tokenizer.decode(self.ids, skip_special_tokens=True))
            eos = self.tokenizer.eos_token_id
            if self.ids and self.ids[-1] == eos:
                self.usage.finish_reason = "stop"


class _Halt(StoppingCriteria):  # type: ignore[misc]
    """Ends the answer when the decoder stopped or the client left; between tokens, gives the
    model to the requests waiting for it."""

    def __init__(self, decoder: _Decoder, max_tokens: int, between_steps: Callable[[], None]) -> None:
        self.decoder = decoder
        self.max_tokens = max_tokens
        self.between_steps = between_steps

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        halt = self.decoder.stopped or self.decoder.cancel.is_set()
        if not halt and self.decoder.usage.completion_tokens < self.max_tokens:  # none after the last
            self.between_steps()
        return torch.full((input_ids.shape[0],), halt, dtype=torch.bool, device=input_ids.device)


class Stream:
    """An answer being generated: `version` is known at once, `deltas()` yields its text."""

    def __init__(self, version: str, out: queue.Queue[tuple[str, Any]], cancel: threading.Event,
                 usage: Usage) -> None:
        self.version = version
        self.usage = usage
        self._out = out
        self._cancel = cancel

    def deltas(self) -> Iterator[str]:
        try:
            while True:
                kind, value = self._out.get()
                if kind == "text":
                    yield value
                elif kind == "error":
                    raise value
                else:
                    return
        finally:
            self._cancel.set()  # the client left early: stop generating at the next token

    def text(self) -> str:
        return "".join(self.deltas())


class Generator:
    """Generates with the runtime's model; `start` returns once the answer's version is fixed."""

    def __init__(self, runtime: ModelRuntime, max_prompt_tokens: int, turn_tokens: int = 128,
                 turn_ms: float = 250.0) -> None:
        self.runtime = runtime
        self.max_prompt_tokens = max_prompt_tokens
        self.turn_tokens = turn_tokens  # prompt tokens read per turn: 2,048 take seconds on a CPU
        # Tokens are generated for this long per turn: one token is a small share of a classify's
        # turn, and a chat answer stepping aside after each would crawl behind a few classify clients.
        self.turn_s = turn_ms / 1000

    def start(self, prompt: list[int], sampling: Sampling, version: str = LIVE) -> Stream:
        """Begin generating; raises what pinning `version` raises (unknown or unsafe version)."""
        if len(prompt) > self.max_prompt_tokens:
            raise PromptTooLong(f"the prompt has {len(prompt)} tokens; this server takes at most "
                                f"{self.max_prompt_tokens} (`serving.max_prompt_tokens`)")
        if not prompt:
            raise PromptTooLong("the prompt is empty")
        out: queue.Queue[tuple[str, Any]] = queue.Queue()
        cancel = threading.Event()
        usage = Usage(prompt_tokens=len(prompt))
        thread = threading.Thread(target=self._run, args=(prompt, sampling, version, out, cancel, usage),
                                  name="generate", daemon=True)
        thread.start()
        kind, value = out.get()  # the version once pinned, or the error that prevented it
        if kind == "error":
            raise value
        return Stream(value, out, cancel, usage)

    def _run(self, prompt: list[int], sampling: Sampling, version: str,
             out: queue.Queue[tuple[str, Any]], cancel: threading.Event, usage: Usage) -> None:
        tokenizer = self.runtime.tokenizer
        try:
            with self.runtime.pinned(version) as run:
                out.put(("version", run.version))
                decoder = _Decoder(tokenizer, sampling.stop, out, cancel, usage)
                if sampling.seed is not None:
                    torch.manual_seed(sampling.seed)  # under the inference lock: no other sampler
                greedy = sampling.temperature == 0
                ids = torch.tensor([prompt], device=self.runtime.device)
                with torch.inference_mode():
                    run.model.generate(
                        input_ids=ids, attention_mask=torch.ones_like(ids), cache=self._prefill(run.model, ids),
                        max_new_tokens=sampling.max_tokens, do_sample=not greedy,
                        temperature=None if greedy else sampling.temperature,
                        top_p=None if greedy else sampling.top_p, top_k=None,
                        pad_token_id=tokenizer.pad_token_id, streamer=decoder,
                        stopping_criteria=StoppingCriteriaList([_Halt(decoder, sampling.max_tokens,
                                                                      lambda: self._step_aside(self.turn_s))]))
            out.put(("end", None))
        except Exception as exc:  # handed to the request thread, which answers with it
            LOG.debug("generation failed", exc_info=True)
            out.put(("error", exc))

    def _prefill(self, model: torch.nn.Module, ids: torch.Tensor) -> DynamicCache | None:
        """The cache of a long prompt but its last token (`generate` computes that one), built
        `turn_tokens` at a time with a step aside between chunks; None for a short prompt."""
        if ids.shape[1] <= self.turn_tokens:
            return None
        cache = DynamicCache(config=model.config)
        for start in range(0, ids.shape[1] - 1, self.turn_tokens):
            model(input_ids=ids[:, start:min(start + self.turn_tokens, ids.shape[1] - 1)], cache=cache,
                  use_cache=True, logits_to_keep=1)
            self._step_aside()
        return cache

    def _step_aside(self, after_s: float = 0.0) -> None:
        """Once the turn has lasted `after_s`, let the requests waiting for the model go first;
        this answer's random stream (a seeded one included) continues as if nothing else had run."""
        device = self.runtime.device
        state = torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        if self.runtime.step_aside(after_s):
            torch.set_rng_state(state[0])
            if state[1] is not None:  # sampling on a GPU draws from the device's generator
                torch.cuda.set_rng_state(state[1], device)
