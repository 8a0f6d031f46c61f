"""One update, end to end on the learner's side: warm start, train, consolidate, save, judge.

The registry (in service/) owns version names and the live pointer; this module only reads
the live adapter's directory and writes the candidate into the directory it is given.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from torch import distributed as dist
from torch import nn
from transformers import PreTrainedTokenizerBase

from learners.base_model import load_base
from learners.canary import canary_loss, load_canary
from learners.config import AdapterSettings, GateSettings, TrainSettings
from learners.ewc import EwcPenalty, consolidate, empirical_fisher
from learners.gate import ProbeMatrix, Votes, evaluate, finite_scores, judge, score_probes, window_scores
from learners.general import GeneralText
from learners.methods import peft_config, warm_start
from learners.placement import CPU, Placement
from learners.privacy import private_round
from learners.probes import budgeted_probes
from learners.prompts import Example, examples_by_ticket, ticket_examples
from learners.replies import reply_conditions, reply_probes, score_replies
from learners.reports import Canary, GateReport, Progress, ReplyScore, RoundReport, UpdateOutcome
from learners.score_cache import read_probe_scores, write_probe_scores
from learners.scoring import LabelScorer
from learners.train import answer_loss, collate, run_round
from replay.buffer import Snapshot
from streams.records import TicketRecord

EWC_FILE = "ewc.safetensors"
TRAIN_CONFIG_FILE = "train_config.json"  # the settings a version was trained with


def initial_adapter(base_path: Path, out_dir: Path, cfg: AdapterSettings, seed: int,
                    placement: Placement = CPU) -> None:
    """The first version, untrained. LoRA (B = 0) and IA3 (scales of 1) answer exactly as the
    base does; prefix tuning starts from random virtual tokens, which shift answers slightly."""
    base, _ = load_base(base_path, placement)
    torch.manual_seed(seed)
    get_peft_model(base, peft_config(cfg)).save_pretrained(out_dir)


def train_adapter(new_records: Sequence[TicketRecord], replay_records: Sequence[TicketRecord],
                  base_path: Path, live_dir: Path, out_dir: Path, cfg: TrainSettings,
                  on_progress: Callable[[Progress], None] | None = None,
                  cancel: threading.Event | None = None,
                  midway: Callable[[nn.Module], None] | None = None, placement: Placement = CPU,
                  ) -> tuple[PeftModel, PreTrainedTokenizerBase, RoundReport]:
    """Warm-start from the live adapter (in its own method), train, consolidate EWC, save.

    With EWC off, no Fisher is measured or saved (it costs a backward pass per sampled example);
    switching it on later starts the consolidation from that update's window. With
    `train.privacy` on, the round is DP-SGD over the tickets (`learners.privacy`).
    Under torchrun every rank runs this whole function (`run_round` shards the batches);
    only rank 0 writes `out_dir`.
    """
    base, tokenizer = load_base(base_path, placement)
    model = warm_start(base, live_dir)
    if cfg.privacy.enabled:  # each ticket's examples kept together: the ticket is the unit of privacy
        report = private_round(model, examples_by_ticket(tokenizer, new_records, cfg.max_length, cfg.system_prompt),
                               examples_by_ticket(tokenizer, replay_records, cfg.max_length, cfg.system_prompt),
                               cfg, tokenizer.pad_token_id, on_progress, cancel)
        ewc = None
    else:
        new = ticket_examples(tokenizer, new_records, cfg.max_length, cfg.system_prompt)
        replay = ticket_examples(tokenizer, replay_records, cfg.max_length, cfg.system_prompt)
        previous = (EwcPenalty.load(live_dir / EWC_FILE, cfg.ewc.strength, placement.torch_device)
                    if cfg.ewc.enabled and (live_dir / EWC_FILE).exists() else None)
        general = (GeneralText(tokenizer, tokenizer.pad_token_id, cfg.general_rows, cfg.seed)
                   if cfg.keep_general > 0 else None)
        report = run_round(model, new, replay, cfg, tokenizer.pad_token_id, previous, on_progress, cancel, general,
                           midway)
        ewc = consolidate_window(model, new, previous, cfg, tokenizer.pad_token_id) if cfg.ewc.enabled else None
    if not dist.is_initialized() or dist.get_rank() == 0:
        model.save_pretrained(out_dir)
        (out_dir / TRAIN_CONFIG_FILE).write_text(cfg.model_dump_json(indent=2))
        if ewc is not None:
            ewc.save(out_dir / EWC_FILE)
    return model, tokenizer, report


def consolidate_window(model: PeftModel, new: Sequence[Example], previous: EwcPenalty | None,
                       cfg: TrainSettings, pad_id: int) -> EwcPenalty:
    """The EWC state after learning a window: its Fisher, measured at the weights just learned
    (where the penalty will anchor them), joined with the decayed old one."""
    count = min(len(new), cfg.ewc.fisher_samples)
    samples = [collate([new[i * len(new) // count]], pad_id) for i in range(count)]
    fisher = empirical_fisher(model, samples, answer_loss)
    return consolidate(previous, fisher, model, cfg.ewc.decay, cfg.ewc.strength)


def known_labels(snapshot: Snapshot) -> set[str]:
    """The labels the live version was trained on: those of the windows it learned (their
    probes) and of the replay rows drawn from them."""
    old = [r for w, rows in snapshot.probes.items() if w not in snapshot.new_windows for r in rows]
    return {r.label for r in [*old, *snapshot.replay] if r.label}


def train_candidate(snapshot: Snapshot, base_path: Path, live_dir: Path, out_dir: Path,
                    cfg: TrainSettings, policy: GateSettings,
                    on_progress: Callable[[Progress], None] | None = None,
                    cancel: threading.Event | None = None,
                    best_before: Mapping[int, float] | None = None,
                    shortlists: Mapping[str, Sequence[str]] | None = None,
                    votes: Votes | None = None, vote_weight: float = 0.0,
                    start_dir: Path | None = None, placement: Placement = CPU) -> UpdateOutcome:
    """Train a candidate warm-started from the live adapter, save it to `out_dir`, gate it.

    The candidate's probe scores are saved with it (`learners.score_cache`); the live version's,
    saved when it was the candidate, are read back, so it is scored only on what they lack.

    `best_before`: each window's best accuracy under earlier live versions (see `judge`).
    `shortlists`: the labels each probe (by id) is judged among (see `score_probes`).
    `votes`, `vote_weight`: the buffer's vote on each probe and its weight in the answer (`window_score`).
    `start_dir`: the adapter training starts from, when not the live one (a search's fresh adapter
    of another rank, `learners.hpo`; a federated round's global adapter); the gate still judges
    against the live version.
    `placement`: where training and the gate run, in what precision (`learners.placement`).
    """
    model, tokenizer, report = train_adapter(snapshot.new, snapshot.replay, base_path, start_dir or live_dir,
                                             out_dir, cfg, on_progress, cancel, placement=placement)
    scored = score_candidate(model, tokenizer, snapshot, out_dir, cfg, policy, shortlists)
    del model  # before the live version is loaded: one model in memory at a time
    gate = judge_candidate(scored, snapshot, base_path, live_dir, cfg, policy, best_before, shortlists, votes,
                           vote_weight, placement)
    return UpdateOutcome(gate=gate, train=report, labels=list(snapshot.labels))


def evaluate_candidate(snapshot: Snapshot, base_path: Path, live_dir: Path, candidate_dir: Path, out_dir: Path,
                       cfg: TrainSettings, policy: GateSettings,
                       shortlists: Mapping[str, Sequence[str]] | None = None,
                       votes: Votes | None = None, vote_weight: float = 0.0,
                       placement: Placement = CPU) -> UpdateOutcome:
    """Gate an adapter trained elsewhere (a federated round's average, `learners.federated`) as
    `train_candidate` gates its own: the same probes, the same scores, against the live version.
    Its probe scores go to `out_dir`; the round report is None, nothing having trained here."""
    base, tokenizer = load_base(base_path, placement)
    model = PeftModel.from_pretrained(base, candidate_dir)
    scored = score_candidate(model, tokenizer, snapshot, out_dir, cfg, policy, shortlists)
    del model, base
    gate = judge_candidate(scored, snapshot, base_path, live_dir, cfg, policy, None, shortlists, votes,
                           vote_weight, placement)
    return UpdateOutcome(gate=gate, train=None, labels=list(snapshot.labels))


@dataclass
class CandidateScores:
    """What the gate measured of a candidate before the live version is loaded beside it."""

    tokenizer: PreTrainedTokenizerBase
    scorer: LabelScorer
    probes: dict[int, list[TicketRecord]]
    windows: dict[int, ProbeMatrix]
    canary: list[str]
    canary_loss: float
    replying: dict[int, list[TicketRecord]]
    replies: dict[int, ReplyScore]
    seconds: float


def score_candidate(model: nn.Module, tokenizer: PreTrainedTokenizerBase, snapshot: Snapshot, out_dir: Path,
                    cfg: TrainSettings, policy: GateSettings,
                    shortlists: Mapping[str, Sequence[str]] | None = None) -> CandidateScores:
    """The candidate's scores on every window's probes, its canary loss and replies; its probe
    scores saved to `out_dir` (`learners.score_cache`) for when it is the live version."""
    started = time.perf_counter()
    scorer = LabelScorer(tokenizer, snapshot.labels)
    canary = load_canary(policy.canary_file) if policy.max_canary_increase is not None else []
    probes = budgeted_probes(snapshot.probes, snapshot.new_windows, policy.probe_budget)
    windows = score_probes(model, scorer, probes, shortlists)
    replying = reply_probes(snapshot.probes, snapshot.new_windows, policy.reply_probe_budget)
    replies, reply_cells = score_replies(model, tokenizer, replying, cfg, policy.reply_generations,
                                         policy.reply_max_tokens)
    write_probe_scores(out_dir, finite_scores(windows, scorer.labels), reply_cells,
                       reply_conditions(cfg, policy.reply_max_tokens))
    return CandidateScores(tokenizer=tokenizer, scorer=scorer, probes=probes, windows=windows, canary=canary,
                           canary_loss=canary_loss(model, tokenizer, canary), replying=replying, replies=replies,
                           seconds=time.perf_counter() - started)


def judge_candidate(candidate: CandidateScores, snapshot: Snapshot, base_path: Path, live_dir: Path,
                    cfg: TrainSettings, policy: GateSettings, best_before: Mapping[int, float] | None,
                    shortlists: Mapping[str, Sequence[str]] | None, votes: Votes | None, vote_weight: float,
                    placement: Placement) -> GateReport:
    """The live version (and the base model, for forward transfer and canary drift) scored on the
    candidate's probes, and the gate's verdict on the two (`judge`)."""
    started = time.perf_counter()
    tokenizer, scorer, probes = candidate.tokenizer, candidate.scorer, candidate.probes
    known = known_labels(snapshot)
    live_model = PeftModel.from_pretrained(load_base(base_path, placement)[0], live_dir)
    cached = read_probe_scores(live_dir)
    live = score_probes(live_model, scorer, probes, shortlists, cached.scores)
    live_canary = canary_loss(live_model, tokenizer, candidate.canary)
    live_replies, _ = score_replies(live_model, tokenizer, candidate.replying, cfg, policy.reply_generations,
                                    policy.reply_max_tokens,
                                    cached.replies_if(reply_conditions(cfg, policy.reply_max_tokens)))
    with live_model.disable_adapter():  # the base model, for forward transfer and canary drift
        base_scores = evaluate(live_model, scorer, {w: probes[w] for w in snapshot.new_windows if w in probes},
                               shortlists=shortlists, votes=votes, vote_weight=vote_weight)
        base_canary = canary_loss(live_model, tokenizer, candidate.canary)
    gate = judge(window_scores(candidate.windows, scorer.labels, known, votes, vote_weight),
                 window_scores(live, scorer.labels, known, votes, vote_weight),
                 snapshot.new_windows, policy, best_before=best_before, base=base_scores,
                 canary=(Canary(candidate=candidate.canary_loss, live=live_canary, base=base_canary)
                         if candidate.canary else None),
                 replies=(candidate.replies, live_replies))
    return gate.model_copy(update={"seconds": candidate.seconds + time.perf_counter() - started,
                                   "live_scores_reused": sum(m.reused for m in live.values()),
                                   "live_scores_computed": sum(m.computed for m in live.values()),
                                   "live_replies_reused": sum(s.reused for s in live_replies.values())})
