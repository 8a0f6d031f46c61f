"""One update's training and gating in a process of its own: `python -m learners.worker`.

The serving process (`service.worker_process`) starts this module ahead of an update, so that
its imports of torch, transformers and PEFT (10-14 s on 2 cores) are done when the update
starts; it then writes a `Job` (the snapshot, the paths, the settings) as a JSON file and sends
the file's path as the first line on stdin; it trains with its own torch thread budget, so queries
keep being answered, and writes the candidate into `Job.out_dir`. It talks back with one JSON
object per line on stdout: started, progress, then done, cancelled or failed (`learners.messages`).

Its stdin carries the other direction: a `cancel` line stops training at the next step. End of
stdin means the serving process is gone: nobody will read the result, so the worker exits at once
rather than keep writing into a draft directory a restarted service is about to remove.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import IO, Literal

import torch
from pydantic import BaseModel, Field

from learners.config import GateSettings, TrainSettings
from learners.federated import SITE_SCORES_FILE, SiteScores
from learners.hpo import Search
from learners.hpo_config import HpoSettings
from learners.messages import (
    CancelledMessage,
    DoneMessage,
    FailedMessage,
    ProgressMessage,
    StartedMessage,
    WorkerMessage,
)
from learners.placement import CPU, Placement
from learners.reports import Progress
from learners.train import Cancelled
from learners.update_step import evaluate_candidate, train_candidate
from replay.buffer import Snapshot

LOG = logging.getLogger(__name__)
CANCEL = "cancel"
EXIT_CANCELLED = 3
EXIT_ORPHANED = 4


class Job(BaseModel):
    """Everything the worker needs, written by the serving process as JSON."""

    snapshot: Snapshot = Field(description="New window, replay sample and probes (see `ReplayBuffer.snapshot`).")
    base_path: Path = Field(description="Directory of the base model.")
    live_dir: Path = Field(description="The live adapter, the warm start and the gate's reference.")
    out_dir: Path = Field(description="Where the candidate is written (the registry's draft directory).")
    train: TrainSettings
    gate: GateSettings
    placement: Placement = Field(default=CPU, description="Device and precision of training and gating "
                                                          "(`train.device`, `model.precision`), checked at start-up.")
    best_before: dict[int, float] = Field(description="Each window's best accuracy under earlier live versions.")
    shortlists: dict[str, list[str]] = Field(default={}, description="The labels each probe (by id) is judged "
                                                                     "among; a probe without one: every label.")
    votes: dict[str, dict[str, float]] = Field(
        default={}, description="The buffer's vote on each probe (by id): label → share "
                                "(`replay.shortlist.vote_shares`); with a search, on each training row too, "
                                "its own stored copy not voting (`learners.validation`).")
    vote_weight: float = Field(default=0.0, ge=0, description="The vote's weight in an answer "
                                                              "(`replay.vote_weight`).")
    hpo: HpoSettings = Field(default=HpoSettings(), description="The hyperparameter search before training.")
    study_journal: Path | None = Field(default=None, description="The search's Optuna journal (None: a study "
                                                                 "of this update's trials only).")
    live_untrained: bool = Field(default=False, description="The live version has learned no window (the "
                                                            "first version): the search may change the rank.")
    task: Literal["update", "evaluate"] = Field(
        default="update", description="update: train a candidate and gate it; evaluate: gate `candidate_dir`, "
                                      "trained elsewhere (a federated round's), and write its per-probe scores "
                                      f"to `out_dir/{SITE_SCORES_FILE}` for the hub.")
    start_dir: Path | None = Field(default=None, description="The adapter training starts from, when not the "
                                                             "live one (a federated round's global adapter).")
    candidate_dir: Path | None = Field(default=None, description="The adapter an evaluation gates.")


def thread_budget(cfg: TrainSettings) -> int:
    """`train.threads`, or half the cores this process may run on (the other half serves)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
    return cfg.threads or max(1, cores // 2)


class Reporter:
    """Writes protocol lines; adds an ETA from the pace of the steps seen so far."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self._first: tuple[float, int] | None = None  # when the first reported step of the round ended
        self._round: int | None = None  # the search's trial the steps belong to (None: the candidate's)

    def send(self, message: WorkerMessage) -> None:
        try:
            self.out.write(message.model_dump_json() + "\n")
            self.out.flush()
        except BrokenPipeError:  # the serving process died (kill -9): not a training failure
            LOG.warning("the serving process is gone: stopping")
            os._exit(EXIT_ORPHANED)

    def progress(self, p: Progress) -> None:
        now, eta_s = time.monotonic(), None
        if self._first is None or p.trial != self._round:
            self._round = p.trial
            self._first = (now, p.step)
        elif p.step > self._first[1]:
            per_step = (now - self._first[0]) / (p.step - self._first[1])
            eta_s = per_step * (p.steps - p.step)
        self.send(ProgressMessage(**dict(p), eta_s=eta_s))


def watch_stdin(cancel: threading.Event) -> None:
    """Sets `cancel` on a `cancel` line; exits the process when the parent closes stdin."""
    for line in sys.stdin:
        if line.strip() == CANCEL:
            cancel.set()
    LOG.warning("the serving process is gone: stopping")
    os._exit(EXIT_ORPHANED)


def main(job_file: Path) -> int:
    # Protocol lines own the real stdout; anything a library prints goes to stderr instead.
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    reporter = Reporter(out)
    cancel = threading.Event()
    threading.Thread(target=watch_stdin, args=(cancel,), name="stdin", daemon=True).start()
    try:
        job = Job.model_validate_json(job_file.read_text())
        threads = thread_budget(job.train)
        torch.set_num_threads(threads)
        reporter.send(StartedMessage(pid=os.getpid(), threads=threads))
        if job.task == "evaluate":
            return evaluate(job, reporter)
        winner = (Search(job.snapshot, job.base_path, job.live_dir, job.live_untrained, job.train, job.hpo,
                         job.study_journal, job_file.parent / "hpo", reporter.progress, cancel, job.placement,
                         job.votes, job.vote_weight).run()
                  if job.hpo.searching else None)
        outcome = train_candidate(job.snapshot, job.base_path, job.live_dir, job.out_dir,
                                  winner.cfg if winner else job.train, job.gate, reporter.progress, cancel,
                                  job.best_before, job.shortlists, job.votes, job.vote_weight,
                                  winner.start_dir if winner else job.start_dir, job.placement)
        if winner is not None:
            outcome = outcome.model_copy(update={"search": winner.report})
    except Cancelled as exc:
        reporter.send(CancelledMessage(reason=str(exc)))
        return EXIT_CANCELLED
    except Exception as exc:  # reported to the parent, which marks the update failed
        LOG.exception("training failed")
        reporter.send(FailedMessage(reason=f"{type(exc).__name__}: {exc}"))
        return 1
    reporter.send(DoneMessage(**dict(outcome)))
    return 0


def evaluate(job: Job, reporter: Reporter) -> int:
    if job.candidate_dir is None:
        raise ValueError("an evaluation needs `candidate_dir`")
    outcome = evaluate_candidate(job.snapshot, job.base_path, job.live_dir, job.candidate_dir, job.out_dir,
                                 job.train, job.gate, job.shortlists, job.votes, job.vote_weight, job.placement)
    (job.out_dir / SITE_SCORES_FILE).write_text(SiteScores.of(outcome.gate).model_dump_json())
    reporter.send(DoneMessage(**dict(outcome)))
    return 0


def wait_for_job() -> Path | None:
    """The job file, sent on stdin once an update starts; None when the service closes stdin
    first (it is stopping, or discarded this process)."""
    line = sys.stdin.readline().strip()
    return Path(line) if line else None


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s[worker]: %(message)s")
    job = wait_for_job()
    sys.exit(main(job) if job is not None else 0)
