"""What an update reports: training progress, the round's figures and the gate's verdict.

These are the contract between the learner and whoever reads it: the worker sends them to the
service (`learners.messages`), the registry keeps them in each version's `evergreen.json`, and
the API serves them, so `/openapi.json` documents them. Fields added after the first versions
were written have defaults, so every version's metadata still loads.

This module imports neither torch nor transformers: the service's registry reads it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, computed_field

from learners.config import GateSettings

TEST_NAME = "exact one-sided McNemar test on the paired probe records"


class Report(BaseModel):
    # A diverged round's NaN loss must survive the worker's pipe and the registry's JSON (as
    # `json.dumps` lets it); pydantic's default would write null, which no float field reads back.
    model_config = ConfigDict(frozen=True, ser_json_inf_nan="constants")


class Progress(Report):
    """One training step done."""

    step: int = Field(description="Steps done.")
    steps: int = Field(description="Steps of the round.")
    loss: float = Field(description="Answer loss of the step's batch.")
    penalty: float = Field(description="EWC penalty plus general-text drift of the step.")
    tokens_per_s: float = Field(description="Training throughput since the round started.")


class RoundReport(Report):
    steps: int
    examples_new: int
    examples_replay: int
    final_loss: float
    tokens: int = Field(description="Tokens trained on (this rank's share under torchrun).")
    seconds: float
    threads: int | None = Field(default=None, description="Torch threads it trained with (unknown for old versions).")


class WindowScore(Report):
    """A version's accuracy on one window's probes (by label scoring), mean negative
    log-likelihood of the true label, and which probes were right (in probe order, for paired
    tests; kept out of the JSON)."""

    accuracy: float
    loss: float
    n: int = Field(description="Labelled probes scored.")
    correct: tuple[bool, ...] = Field(default=(), exclude=True, repr=False)
    majority_rate: float = Field(default=0.0, description="Accuracy of always answering the window's commonest label.")
    known_accuracy: float | None = Field(
        default=None, description="Accuracy among the labels the live version knew, on the probes of one of them.")
    known_correct: tuple[bool, ...] = Field(default=(), exclude=True, repr=False)


class Check(Report):
    """One check of the gate: `observed` against `threshold`, and the test's p-value."""

    name: str
    passed: bool
    observed: float
    threshold: float
    p_value: float | None = Field(default=None, description="Of the exact test; none for a check without one.")
    detail: str = ""


class Canary(Report):
    """Mean per-token loss on general prompts: drift from the base measures general forgetting."""

    candidate: float
    live: float
    base: float

    @computed_field(description="Candidate loss minus base loss: the general ability lost.")  # type: ignore[prop-decorator]
    @property
    def drift(self) -> float:
        return self.candidate - self.base


class GateReport(Report):
    """The gate's verdict on a candidate, with every score and check it was drawn from."""

    passed: bool
    reason: str = Field(description="The first failing check, or how many passed.")
    test: str = Field(default="", description="The statistical test behind the checks' p-values.")
    new_windows: tuple[int, ...] = Field(description="The windows the candidate learned.")
    candidate: dict[int, WindowScore] = Field(description="The candidate's score on every window's probes.")
    live: dict[int, WindowScore] = Field(description="The live version's, on the same probes.")
    base: dict[int, WindowScore] = Field(default={}, description="The base model's, on the new windows' probes.")
    checks: list[Check] = []
    canary: Canary | None = None
    thresholds: GateSettings = Field(description="The gate settings it was judged by.")
    seconds: float | None = Field(default=None, description="Time spent scoring and judging (unknown for old "
                                                            "versions).")


class UpdateOutcome(Report):
    """What one update produced: the gate's verdict on its candidate, the round's figures, and
    the labels the candidate knows."""

    gate: GateReport
    train: RoundReport
    labels: list[str]
