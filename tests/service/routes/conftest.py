"""Helpers of the router tests: a gate report that the adapter and the update listings both summarize."""

from __future__ import annotations

from learners.config import GateSettings
from learners.reports import Check, GateReport, WindowScore


def five_window_rejection() -> GateReport:
    """A gate report that rejected a candidate of window 5 for forgetting window 1."""
    windows = range(1, 6)
    return GateReport(passed=False, reason="drop on window 1: 0.300 against threshold 0.050", new_windows=(5,),
                      candidate={w: WindowScore(accuracy=0.5, loss=0.9, n=4) for w in windows},
                      live={w: WindowScore(accuracy=0.8, loss=0.4, n=4) for w in windows},
                      base={5: WindowScore(accuracy=0.25, loss=1.4, n=4)},
                      checks=[Check(name=f"drop on window {w}", passed=w > 1, observed=0.3 if w == 1 else 0.0,
                                    threshold=0.05) for w in windows[:-1]],
                      thresholds=GateSettings(), seconds=1.5, live_scores_reused=12, live_scores_computed=8)


# What a listing serves of `five_window_rejection()`.
FIVE_WINDOW_SUMMARY = {"passed": False, "reason": "drop on window 1: 0.300 against threshold 0.050", "test": "",
                       "new_windows": [5], "canary": None, "thresholds": GateSettings().model_dump(),
                       "retryable": False, "at_fault": [], "seconds": 1.5, "live_scores_reused": 12,
                       "live_scores_computed": 8,
                       "live_replies_reused": 0, "checks_passed": 3, "checks_failed": 1}
