"""A site's part in federated rounds (issue 17): train for the hub, gate the hub's candidate, adopt it.

A federation's sites each run the normal service on their own stream and buffer; a hub (Flower,
`service.federation`) drives rounds through each site's Flower client, which calls this site's
`/v1/federation` API. A round is three updates of the usual kind, one at a time with local ones:

1. `fit`: the open window is closed and snapshotted as any update's (new tickets, replay,
   probes, the privacy budget: a round under `train.privacy` is entered in the ledger first),
   an adapter is trained from the hub's global one (at `federation.fit_learning_rate_scale`
   times the learning rate, with no search), gated here on this site's probes, and its weights
   go back. Nothing is registered: it is one site's share of a candidate.
2. `evaluate`: the hub's average of the sites' adapters is gated on the probes of this site's fit
   snapshot against the live version; the per-probe results (`learners.federated.SiteScores`)
   go back, for the hub to pool with the other sites' and judge.
3. `adopt`: a candidate the hub's pooled gate passed is published into this registry, with the
   hub's report, and promoted: the replicas follow it on the promotions topic as any promotion.

Weights are checked before anything reads them: safetensors only (nothing unpickled), the live
adapter's tensor names, shapes and dtypes, finite values, and the route's size bound.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from pydantic import BaseModel, Field
from safetensors import SafetensorError
from safetensors.torch import load, load_file, save_file

from learners.federated import SITE_SCORES_FILE, SiteScores
from learners.hpo_config import HpoSettings
from learners.reports import GateReport
from service.registry import ADAPTER_WEIGHTS, VersionMetadata
from service.settings import FederationSettings
from service.update_log import UpdateRecord
from service.update_manager import Prepared, UpdateManager

LOG = logging.getLogger(__name__)
ADAPTER_CONFIG = "adapter_config.json"
KEPT_ROUNDS = 4  # fit snapshots kept for the round's evaluation and adoption


class BadWeights(ValueError):
    """Weights this site will not read: not safetensors, or not its live adapter's tensors."""


class RoundRefused(RuntimeError):
    """The site cannot do what the round asks (no fit of that round here, nothing to learn...)."""


class FitReply(BaseModel):
    """What a site sends the hub for a round: its adapter and what it was trained on."""

    examples: int = Field(description="Tickets trained on, new and replayed: the weight of this site's adapter "
                                      "in the hub's average (0: the site did not train, `reason` says why).")
    windows: list[int] = Field(description="The site's windows learned in the round.")
    epsilon_spent: float = Field(description="ε of every private round of this site so far (0 without privacy).")
    reason: str = Field(description="What happened: its own gate's verdict on its adapter, or why it did not train.")
    update: int = Field(description="The site's update that ran the round.")


def read_weights(data: bytes, reference: Path) -> dict[str, torch.Tensor]:
    """Adapter weights sent to this site, checked against the adapter at `reference`."""
    try:
        tensors = load(data)
    except (SafetensorError, ValueError) as exc:
        raise BadWeights(f"not a safetensors file: {exc}") from exc
    expected = load_file(reference / ADAPTER_WEIGHTS)
    if tensors.keys() != expected.keys():
        missing, extra = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
        raise BadWeights(f"not the live adapter's tensors: {len(missing)} missing {missing[:3]}, "
                         f"{len(extra)} unknown {extra[:3]}")
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape or tensor.dtype != expected[name].dtype:
            raise BadWeights(f"{name}: {tuple(tensor.shape)} {tensor.dtype}, the live adapter's is "
                             f"{tuple(expected[name].shape)} {expected[name].dtype}")
        if not torch.isfinite(tensor).all():
            raise BadWeights(f"{name} holds NaN or infinite values")
    return tensors


def write_adapter(directory: Path, tensors: dict[str, torch.Tensor], like: Path) -> Path:
    """A PEFT adapter directory of `tensors`, configured as the adapter at `like`."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(like / ADAPTER_CONFIG, directory / ADAPTER_CONFIG)
    save_file(tensors, str(directory / ADAPTER_WEIGHTS))
    return directory


class FederatedSite:
    """This service's side of the hub's rounds, run as updates by its `UpdateManager`."""

    def __init__(self, updates: UpdateManager, scratch_dir: Path, settings: FederationSettings) -> None:
        self.updates = updates
        self.settings = settings
        self.registry = updates.registry
        self.scratch_dir = scratch_dir
        self._rounds: dict[int, Prepared] = {}  # each round's fit snapshot, for its evaluation and adoption
        self._lock = threading.Lock()

    def live_weights(self) -> tuple[str, bytes]:
        """The live version's name and adapter weights (safetensors): the hub's first global adapter."""
        live = self.registry.live
        if live is None:
            raise RoundRefused("this site has no live version yet")
        return live, (self.registry.path(live) / ADAPTER_WEIGHTS).read_bytes()

    def fit(self, round_number: int, global_weights: bytes) -> tuple[FitReply, bytes]:
        """Train this site's new window and replay from the hub's global adapter; the reply and the
        trained adapter's weights (empty when it did not train)."""
        start = read_weights(global_weights, self._live_dir())
        trained: list[bytes] = []
        examples = 0

        def work(record: UpdateRecord) -> None:
            nonlocal examples
            prepared = self.updates.prepare(record)
            if prepared is None:
                return
            examples = len(prepared.snapshot.new) + len(prepared.snapshot.replay)
            with self._scratch() as scratch:
                start_dir = write_adapter(scratch / "start", start, self.registry.path(prepared.live))
                out_dir = scratch / "candidate"
                out_dir.mkdir()
                # The hub's adapter as it is: no search of other ranks or a fresh start.
                job = self.updates.job(prepared, out_dir, start_dir=start_dir, hpo=HpoSettings(),
                                       train=self.settings.fit_train(self.updates.train))
                outcome = self.updates.run_job(record, job)
                trained.append((out_dir / ADAPTER_WEIGHTS).read_bytes())
            with self._lock:
                self._rounds[round_number] = prepared
                for old in sorted(self._rounds)[:-KEPT_ROUNDS]:
                    del self._rounds[old]
            record.status, record.gate = "contributed", outcome.gate
            record.reason = f"sent to the hub for federated round {round_number}; its own gate: {outcome.gate.reason}"

        record = self._run(f"federated round {round_number}: fit", work)
        contributed = record.status == "contributed"
        return FitReply(examples=examples if contributed else 0, windows=record.windows,
                        epsilon_spent=self.updates.privacy.spent, reason=f"{record.status}: {record.reason}",
                        update=record.id), trained[0] if contributed else b""

    def evaluate(self, round_number: int, candidate_weights: bytes) -> SiteScores:
        """Gate the hub's candidate on this site's probes of `round_number`'s fit, against live."""
        candidate = read_weights(candidate_weights, self._live_dir())
        with self._lock:
            prepared = self._rounds.get(round_number)
        if prepared is None:
            raise RoundRefused(f"this site has no fit of round {round_number} to evaluate on (it did not train "
                               f"in that round, or restarted since)")
        scores: list[SiteScores] = []

        def work(record: UpdateRecord) -> None:
            live = self.registry.live
            if live != prepared.live:
                raise RoundRefused(f"the live version moved from {prepared.live} to {live} since the round's fit")
            record.windows, record.new_records = list(prepared.snapshot.new_windows), 0
            with self._scratch() as scratch:
                # The candidate's probe scores (`learners.score_cache`) and the hub's are written beside it.
                candidate_dir = write_adapter(scratch / "candidate", candidate, self.registry.path(live))
                outcome = self.updates.run_job(record, self.updates.job(prepared, candidate_dir, task="evaluate",
                                                                        candidate_dir=candidate_dir))
                scores.append(SiteScores.model_validate_json((candidate_dir / SITE_SCORES_FILE).read_text()))
            record.status, record.gate = "evaluated", outcome.gate
            record.reason = f"federated round {round_number}'s candidate on this site's probes: {outcome.gate.reason}"

        record = self._run(f"federated round {round_number}: evaluate", work)
        if not scores:
            raise RoundRefused(f"update {record.id} ended {record.status}: {record.reason}")
        return scores[0]

    def adopt(self, round_number: int, weights: bytes, gate: GateReport) -> UpdateRecord:
        """Publish and promote the candidate the hub's pooled gate passed in `round_number`."""
        if not gate.passed:
            raise RoundRefused(f"a candidate the hub's gate rejected is not adopted: {gate.reason}")
        tensors = read_weights(weights, self._live_dir())
        with self._lock:
            prepared = self._rounds.pop(round_number, None)

        def work(record: UpdateRecord) -> None:
            live = self.registry.live
            assert live is not None
            learned = self.registry.info(live)
            windows = list(prepared.snapshot.new_windows) if prepared is not None else []
            record.windows = windows
            with self.registry.draft() as draft:
                write_adapter(draft.path, tensors, self.registry.path(live))
                info = self.registry.publish(draft, VersionMetadata(
                    parent=live, verdict="accepted",
                    windows_trained=sorted({*learned.windows_trained, *windows}),
                    labels=list(prepared.snapshot.labels) if prepared is not None else learned.labels, gate=gate))
            record.version, record.gate = info.name, gate
            record.reason = f"federated round {round_number}, judged at the hub on every site's probes: {gate.reason}"
            self.updates.live.promote(info.name)
            record.status = "promoted"
            self.updates.prune()

        return self._run(f"federated round {round_number}: adopt", work)

    def _live_dir(self) -> Path:
        live = self.registry.live
        if live is None:
            raise RoundRefused("this site has no live version yet")
        return self.registry.path(live)

    def _run(self, trigger: str, work: Callable[[UpdateRecord], None]) -> UpdateRecord:
        record = self.updates.start(trigger, work)
        self.updates.wait(record)
        return record

    @contextmanager
    def _scratch(self) -> Iterator[Path]:
        self.scratch_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="evergreen-federated-", dir=self.scratch_dir) as scratch:
            yield Path(scratch)
