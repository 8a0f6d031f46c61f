"""learners: incremental PEFT-adapter updates with EWC and replay, and the forgetting gate."""

from learners.base_model import SMOLLM2, TINY_LLAMA, load_base, resolve_base_model
from learners.config import AdapterSettings, EwcSettings, GateSettings, TrainSettings
from learners.gate import GateReport, WindowScore, evaluate, judge
from learners.methods import peft_config, warm_start
from learners.scoring import LabelScorer
from learners.train import Cancelled, Progress, RoundReport, run_round
from learners.update import UpdateOutcome, initial_adapter, train_adapter, train_candidate

__all__ = [
    "SMOLLM2",
    "TINY_LLAMA",
    "AdapterSettings",
    "Cancelled",
    "EwcSettings",
    "GateReport",
    "GateSettings",
    "LabelScorer",
    "Progress",
    "RoundReport",
    "TrainSettings",
    "UpdateOutcome",
    "WindowScore",
    "evaluate",
    "initial_adapter",
    "judge",
    "load_base",
    "peft_config",
    "resolve_base_model",
    "run_round",
    "train_adapter",
    "train_candidate",
    "warm_start",
]
