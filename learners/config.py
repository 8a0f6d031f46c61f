"""Settings of the incremental update and of the forgetting gate."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

Precision = Literal["float32", "bfloat16", "float16"]  # `model.precision`; see `learners.placement`


class AdapterSettings(BaseModel):
    """The PEFT adapter trained on top of the frozen base model (see `learners.methods`)."""

    method: Literal["lora", "prefix", "ia3"] = Field(
        "lora", description="PEFT method of new adapters; an update warm-starts in the live version's method."
    )
    rank: int = Field(16, gt=0, description="LoRA rank `r`.")
    alpha: int = Field(32, gt=0, description="LoRA `lora_alpha` (scaling is alpha / rank).")
    dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout.")
    target_modules: str | list[str] | None = Field(
        None, description="LoRA and IA3: modules adapted (`all-linear` or a list of names). Unset: "
                          "all linear layers for LoRA, PEFT's default for the architecture for IA3."
    )
    feedforward_modules: list[str] | None = Field(
        None, description="IA3: target modules whose input, not output, is scaled "
                          "(unset: PEFT's default for the architecture)."
    )
    virtual_tokens: int = Field(
        16, gt=0, description="Prefix tuning: learned key/value positions prepended in every layer."
    )

    @model_validator(mode="after")
    def _ia3_reloadable(self) -> AdapterSettings:
        # PEFT saves an IA3 `all-linear` as full module paths, which its own check then refuses
        # against `feedforward_modules` when the adapter is loaded again.
        if self.method == "ia3" and self.target_modules == "all-linear":
            raise ValueError("`target_modules` `all-linear` cannot be reloaded with IA3; list the module names")
        return self


class EwcSettings(BaseModel):
    """Elastic weight consolidation over the trainable (adapter) parameters only."""

    enabled: bool = Field(False, description="Add the EWC penalty to the loss. Off by default: with replay on, any "
                                             "strength that changes the result made new windows learn worse in "
                                             "`bench/cl.py`; it is for streams whose old tickets cannot be kept.")
    strength: float = Field(1e5, gt=0, description="Weight of the EWC quadratic penalty; the Fisher of a learned "
                                                   "window is small, so effective weights are large.")
    decay: float = Field(0.9, ge=0, le=1, description="Online EWC: share of the old Fisher kept.")
    fisher_samples: int = Field(64, gt=0, description="Examples of the window, evenly spread, whose squared "
                                                    "gradients average into the diagonal Fisher.")


class PrivacySettings(BaseModel):
    """Differentially private updates (DP-SGD with Opacus; see `learners.privacy`): the adapter
    is what may leave a site, so each ticket's influence on it is clipped and noised, and the
    privacy loss of every round is accounted against a budget for the service's whole life."""

    enabled: bool = Field(False, description="Train every update with DP-SGD: tickets sampled independently "
                                             "(Poisson) from the new and replay rows alike, each ticket's "
                                             "gradient clipped, Gaussian noise added to the sum. `replay_ratio`, "
                                             "`min_new_epochs`, `keep_general` and EWC do not apply to these "
                                             "rounds; `epochs` and `step_budget` size them as usual.")
    noise_multiplier: float = Field(1.0, gt=0, description="Noise standard deviation as a multiple of "
                                                           "`max_grad_norm` (σ).")
    max_grad_norm: float = Field(1.0, gt=0, description="Bound on each ticket's gradient norm (its examples "
                                                        "together: label and reply) before the noise.")
    delta: float = Field(1e-6, gt=0, lt=1, description="δ of the (ε, δ) guarantee; an update is refused while δ "
                                                      "is not below 1 / the tickets stored.")
    epsilon_budget: float = Field(8.0, gt=0, description="Most ε this service may spend, over all its updates: "
                                                         "an update that would pass it is refused, and the "
                                                         "service trains no more.")
    adapter: AdapterSettings = Field(
        AdapterSettings(rank=1, alpha=2, target_modules=["q_proj", "v_proj"]),
        description="The adapter a private service's first version is made with (`train.adapter` without "
                    "privacy). The noise grows with the weights trained while what a batch of clipped tickets "
                    "can say does not: at ε = 8, 365 BANKING77 tickets, rank 1 on the attention's query and value "
                    "projections (57.6 k weights in SmolLM2-135M) learned their window to 0.82 where the default "
                    "(rank 16 on every linear layer, 4.9 M) stayed at the base model's 0.68. An update warm-starts "
                    "in the live version's adapter, so this applies to a service's first version only.")
    learning_rate: float = Field(
        0.03, gt=0, description="Peak learning rate of private rounds (`train.learning_rate` without privacy), "
                                "for `adapter`'s few weights: at 0.001 they did not move in a round, at 0.1 they "
                                "diverged, without noise too.")


class TrainSettings(BaseModel):
    """One incremental update: optimiser, schedule, batch mix, budget."""

    learning_rate: float = Field(1e-3, gt=0, description="Peak AdamW learning rate.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine floor as a share of the peak.")
    warmup_fraction: float = Field(0.1, ge=0, lt=1, description="Share of steps spent warming up.")
    epochs: float = Field(3.0, gt=0, description="Passes over the new window's training rows.")
    batch_size: int = Field(16, gt=0, description="Examples per optimiser step.")
    max_batch_tokens: int = Field(
        1024, gt=0, description="Most tokens (rows x the longest row) in one forward pass. A larger batch is split "
                                "into passes whose gradients add up to the batch's: the same step, in less memory, "
                                "as a pass's activations grow with its tokens (SmolLM2-135M in float32, two steps "
                                "of 16 replies of 84-108 tokens: peak +8.6 GB in one pass, +4.0 GB at 1024, +2.7 GB "
                                "at 512, and no slower). 1024 keeps a batch of label prompts (up to 64 tokens) in "
                                "one pass.")
    step_budget: float = Field(
        2.0, ge=1, description="Most optimiser steps of an update, as a multiple of the steps its new rows alone "
                               "take at `epochs`: replay shares the budget, so an update's cost does not grow with "
                               "the labels learned before it.")
    min_new_epochs: float = Field(
        1.5, ge=0, description="Fewest passes over the new window's rows within the step budget. Balanced replay "
                               "shrinks the new rows' share of a batch as labels accumulate; under the budget they "
                               "would get ever fewer passes (0.4 at 72 earlier labels) and late windows would not "
                               "be learned, so replay's share is capped at 1 - this / (step_budget x epochs). "
                               "At most `epochs`.")
    replay_ratio: float | Literal["balanced"] = Field(
        "balanced", description="Share of each batch drawn from replay (0 to below 1). `balanced`: the share of "
                                "earlier labels among all labels trained, so every label gets an equal share of "
                                "each batch (of rows, for reply examples).")

    @field_validator("replay_ratio")
    @classmethod
    def _ratio_below_one(cls, value: float | str) -> float | str:
        if isinstance(value, float) and not 0 <= value < 1:
            raise ValueError("`replay_ratio` must be at least 0 and below 1, or `balanced`")
        return value

    @model_validator(mode="after")
    def _new_epochs_within_epochs(self) -> TrainSettings:
        if self.min_new_epochs > self.epochs:
            raise ValueError("`min_new_epochs` cannot exceed `epochs`")
        return self

    keep_general: float = Field(
        1.0, ge=0, description="Weight of the KL drift from the base model on general sentences, added to each "
                               "step's loss so training keeps general ability (0: off; see `learners.general`).")
    general_rows: int = Field(2, gt=0, description="General sentences distilled per step.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_length: int = Field(128, gt=8, description="Longest training sequence, in tokens.")
    system_prompt: str | None = Field(
        None, max_length=2000, description="System message that replies are learned under and that "
                                           "`/v1/chat/completions` puts first in a conversation without one, so "
                                           "the endpoint asks what training taught (unset: the chat template's "
                                           "own default).")
    seed: int = Field(0, description="Seed of sampling, shuffling and adapter initialisation.")
    threads: int = Field(0, ge=0, description="Torch CPU threads of the training process (0: half the "
                                              "cores, at least 1); serving keeps its own (`model.threads`).")
    device: str | None = Field(
        None, pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="Where updates train, when not where the model is served (`model.device`): say `cuda:1` "
                    "beside a server on `cuda:0`, or `cuda` while the CPU serves. Checked at start-up.")
    warm_worker: bool = Field(
        True, description="Keep the next update's training process started, its imports done (10-14 s on 2 cores), "
                          "waiting for its job: an update starts training at once, for the memory of one idle "
                          "Python process with torch and transformers loaded.")
    cancel_grace_seconds: float = Field(
        10.0, gt=0, description="After a cancel, how long the training process may take to stop before it is "
                                "terminated.")
    adapter: AdapterSettings = AdapterSettings()
    ewc: EwcSettings = EwcSettings()
    privacy: PrivacySettings = PrivacySettings()

    @model_validator(mode="after")
    def _private_without_ewc(self) -> TrainSettings:
        if self.privacy.enabled and self.ewc.enabled:
            raise ValueError("`privacy.enabled` needs `ewc.enabled` false: the EWC Fisher is measured on tickets "
                             "without noise, and it would carry them into every later update")
        if self.privacy.enabled and self.new_adapter.method == "ia3":
            raise ValueError("`privacy.enabled` needs `privacy.adapter.method` lora or prefix: Opacus computes no "
                             "per-ticket gradient for IA3's scaling vectors")
        return self

    @property
    def new_adapter(self) -> AdapterSettings:
        """The adapter a service's first version is made with: the private one under privacy."""
        return self.privacy.adapter if self.privacy.enabled else self.adapter


class GateSettings(BaseModel):
    """What a candidate must show, against the live version, to be promoted. A regression
    counts only when it passes its threshold and is significant at `alpha`."""

    max_drop: float = Field(
        0.05, ge=0, le=1, description="Largest accuracy drop allowed on any earlier window, among the labels the "
                                      "live version knew (forgetting proper)."
    )
    max_average_forgetting: float = Field(
        0.02, ge=0, le=1, description="Largest average forgetting over earlier windows, among the labels the live "
                                      "version knew."
    )
    max_interference: float = Field(
        0.33, ge=0, le=1, description="Largest average accuracy drop on earlier windows among all labels: their "
                                     "probes lost to the new intents. Looser than `max_drop`, since joint "
                                     "training also confuses close intents; it stops a candidate that answers "
                                     "everything with the newest labels. Chosen by measurement, midway: healthy "
                                     "updates on seven streams lost at most 0.28 (X-Topic, whose topics joint "
                                     "training confuses too), a first update without replay 0.37-0.79 "
                                     "(docs/benchmarks.md)."
    )
    min_gain: float = Field(
        0.0, ge=-1, le=1, description="Smallest accuracy gain over live on the new window(s); a shortfall counts "
                                      "only when the paired test finds the candidate significantly worse."
    )
    require_learning: bool = Field(
        True, description="New windows must be learned significantly beyond chance: the model's probability of "
                          "each probe's label against the same probabilities with the labels dealt to the probes "
                          "at random (permutation test)."
    )
    alpha: float = Field(0.05, gt=0, lt=1, description="Significance level of the gate's exact tests.")
    retry_rejected_windows: bool = Field(
        False, description="Train every rejected update's windows again with the next window. Off: they are "
                           "quarantined (neither learned nor probed) until their version is promoted by hand, "
                           "so a bad batch is not trained in with the next good one, except as "
                           "`retries_after_forgetting` allows.")
    retries_after_forgetting: int = Field(
        1, ge=0, description="Further updates that may learn a window whose candidate learned it but was rejected "
                             "only for what it did to earlier windows (a drop, forgetting, interference, replies): "
                             "its tickets are not at fault, and another update, with other batches, may learn them "
                             "without the harm. Then it is quarantined like any rejected window.")
    max_canary_increase: float | None = Field(
        0.2, ge=0, description="Largest rise of mean canary loss (nats/token) over the base model; "
                               "unset: no canary check. Chosen by measurement: healthy updates that keep "
                               "general ability (`train.keep_general`) drifted -0.04 to 0.074, training without "
                               "it 0.40-0.57 (docs/benchmarks.md).",
    )
    probe_budget: int | None = Field(
        200, gt=0, description="Most probes of earlier windows scored per update, spread evenly over the windows "
                               "and, within each, over its labels; a window's share is a fixed subset of its probes "
                               "(by hash of `id`), so successive updates see the same ones. The new windows' probes "
                               "are always all scored. Unset: every probe, and the gate's cost grows with the "
                               "stream's history.",
    )
    shortlist_labels: int = Field(
        12, ge=0, description="Labels each probe is judged among: those its nearest labelled training tickets in the "
                              "buffer vote for (`replay.shortlist`), so a probe costs the same at 12 labels and at "
                              "300. Candidate and live get the same shortlists, so the paired tests stay paired; a "
                              "probe whose label is not on its shortlist counts as wrong for both (0: every label).",
    )
    shortlist_neighbours: int = Field(64, gt=0, description="Nearest labelled tickets whose labels vote for a "
                                                            "probe's shortlist.")
    canary_file: Path | None = Field(
        None, description="Text file of general prompts, one per line. Unset: the built-in set."
    )
    max_reply_loss_increase: float | None = Field(
        0.25, ge=0, description="Largest rise of the mean answer loss (nats/token) on earlier windows' reply "
                                "probes, candidate over live; a rise counts only when a paired permutation test "
                                "finds it significant (unset: no check).")
    max_reply_rouge_drop: float | None = Field(
        0.1, ge=0, le=1, description="Largest drop of the mean ROUGE-L F1 of greedy answers against the reference "
                                     "reply on earlier windows' reply probes, significant by a paired permutation test "
                                     "(unset: no check).")
    reply_probe_budget: int = Field(
        48, ge=0, description="Most reply probes (probes carrying a `reply` or `messages`) of earlier windows "
                              "scored per update, spread over the windows and their labels like `probe_budget`.")
    reply_generations: int = Field(
        16, ge=0, description="Of those, how many each version answers greedily for ROUGE-L: generation costs "
                              "far more than a loss (0: the loss check alone).")
    reply_max_tokens: int = Field(96, gt=0, description="Longest greedy answer to a reply probe, in tokens.")


# Promotes every candidate that finished training: for measuring without a gate (the suite's
# naive and joint runs) and for exercising the update machinery rather than its verdicts.
PROMOTE_ALL = GateSettings(max_drop=1, max_average_forgetting=1, max_interference=1, min_gain=-1,
                           require_learning=False, max_canary_increase=None, max_reply_loss_increase=None,
                           max_reply_rouge_drop=None)
