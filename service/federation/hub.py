"""The federation's hub: Flower's FedAvg over the sites' adapters, gated on their pooled probes.

`python -m service.federation.hub` in `.venv-fed`, started by `evergreen federate hub`. A round:

1. fit: every connected site trains its new window and replay from the global adapter
   (`site_client`). A result is refused, logged, and the round goes on without it, when its
   site is unknown or its signature wrong, or its arrays are not the global adapter's shapes,
   hold NaN or infinities, or are over the size bound. Below `quorum` valid results nothing is
   averaged: no candidate this round. Otherwise the candidate is FedAvg of the valid adapters,
   weighted by the tickets each trained on.
2. evaluate: every site gates the candidate on its own probes against its live version; the hub
   pools the signed per-probe results and applies the usual checks (`learners.federated`).
   Fewer than `quorum` sites' results: not promoted.
3. A promoted candidate becomes the global adapter, and the next round's fit tells every site to
   adopt it (publish it in its registry and promote it: its replicas follow on the promotions
   topic). A last round after the `rounds` trains nothing: it only delivers the last promotion.

Every round's outcome is a line of `rounds.jsonl` in the hub's directory: who contributed, who was
refused and why, ε each site reports spent, the verdict and its checks.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections import Counter
from pathlib import Path

import flwr
import numpy as np
from flwr.common import FitRes, Parameters, Scalar, parameters_to_ndarrays
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg

from learners.config import GateSettings
from learners.federated import SiteScores, judge_pooled
from service.federation.wire import payload, verify

LOG = logging.getLogger("evergreen.hub")
ROUNDS_LOG = "rounds.jsonl"


class GatedFedAvg(FedAvg):
    """FedAvg whose candidates reach the sites only through the pooled gate."""

    def __init__(self, keys: dict[str, str], rounds: int, quorum: int, policy: GateSettings,
                 max_weights_bytes: int, out_dir: Path, wait_for: int | None = None) -> None:
        """`wait_for`: sites connected before a round starts (default: the quorum); every site
        connected then takes part."""
        super().__init__(fraction_fit=1.0, fraction_evaluate=1.0, min_fit_clients=quorum,
                         min_evaluate_clients=quorum, min_available_clients=quorum, accept_failures=True)
        self.keys, self.rounds, self.quorum, self.policy = keys, rounds, quorum, policy
        self.first_wait = max(quorum, wait_for or 0)
        self.max_weights_bytes = max_weights_bytes
        self.out_dir = out_dir
        self.global_parameters: Parameters | None = None  # the last promoted (or the first) adapter
        self.candidate: Parameters | None = None  # this round's average, until judged
        self.adoption: dict[str, Scalar] = {}  # the next fit's instruction to adopt a promoted candidate
        self.entry: dict[str, object] = {}  # this round's line of the log

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """The first global adapter: the live adapter most sites hold (every site's first version is
        the same untrained adapter, from the same base and seed), so one site cannot choose it."""
        held: Counter[bytes] = Counter()
        adapters: dict[bytes, Parameters] = {}
        for client in self._everyone(client_manager, self.first_wait):
            try:
                answer = client.get_parameters(flwr.common.GetParametersIns(config={}), timeout=300, group_id=0)
            except Exception as exc:  # a site gone or failing: the others decide
                LOG.warning("a site did not send its live adapter: %r", exc)
                continue
            arrays = parameters_to_ndarrays(answer.parameters)
            if answer.status.code == flwr.common.Code.OK and all(np.isfinite(a).all() for a in arrays):
                digest = payload(arrays)
                held[digest] += 1
                adapters[digest] = answer.parameters
        if not held:
            raise RuntimeError("no site sent a live adapter to start from")
        (digest, count), = held.most_common(1)
        LOG.info("the first global adapter: %d of %d sites' live adapter", count, sum(held.values()))
        self.global_parameters = adapters[digest]
        return self.global_parameters

    # -- fit ----------------------------------------------------------------------------------
    def _fit_config(self, round_number: int) -> dict[str, Scalar]:
        config: dict[str, Scalar] = {"round": round_number, "train": round_number <= self.rounds}
        config |= self.adoption
        return config

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: ClientManager
                      ) -> list[tuple[ClientProxy, flwr.common.FitIns]]:
        self.entry = {"round": server_round, "started_at": time.time(),
                      "delivers_round": self.adoption.get("adopt_round")}
        fit = flwr.common.FitIns(self.global_parameters, self._fit_config(server_round))
        instructions = [(client, fit) for client in self._everyone(client_manager, self.first_wait
                                                                   if server_round == 1 else self.quorum)]
        self.adoption = {}  # delivered with this round's instructions
        return instructions

    def _everyone(self, client_manager: ClientManager, at_least: int) -> list[ClientProxy]:
        """Every site connected, once `at_least` are (FedAvg sizes its sample before it waits, and
        waits for as many as it sampled: a site lost mid-round would stall the next step)."""
        client_manager.wait_for(at_least)
        return client_manager.sample(num_clients=max(at_least, client_manager.num_available()),
                                     min_num_clients=at_least)

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[tuple[ClientProxy, FitRes] | BaseException]
                      ) -> tuple[Parameters | None, dict[str, Scalar]]:
        self.candidate = None
        accepted, refused, idle = [], {}, {}
        assert self.global_parameters is not None  # `initialize_parameters` set it
        reference = parameters_to_ndarrays(self.global_parameters)
        for proxy, result in results:
            site = str(result.metrics.get("site", "?"))
            arrays = parameters_to_ndarrays(result.parameters)
            why = self._refusal(server_round, site, arrays, reference, result)
            if why is not None:
                refused[site] = why
                LOG.warning("round %d: refused %s's adapter: %s", server_round, site, why)
            elif result.num_examples == 0:
                idle[site] = str(result.metrics.get("reason", ""))
                LOG.info("round %d: %s trained nothing: %s", server_round, site, idle[site])
            else:
                accepted.append((proxy, result))
        self.entry |= {"fit": {str(r.metrics.get("site")): {"examples": r.num_examples,
                                                              "epsilon_spent": r.metrics.get("epsilon_spent"),
                                                              "reason": r.metrics.get("reason")}
                               for _, r in accepted},
                       "idle": idle, "refused": refused, "fit_failures": [_failure(f) for f in failures]}
        if server_round > self.rounds:
            self._write()
            return None, {}
        if len(accepted) < self.quorum:
            self.entry["outcome"] = (f"no candidate: {len(accepted)} sites' adapters accepted, "
                                     f"below the quorum of {self.quorum}")
            LOG.warning("round %d: %s", server_round, self.entry["outcome"])
            self._write()
            return None, {}
        self.candidate, _ = super().aggregate_fit(server_round, accepted, [])
        return self.candidate, {}

    def _refusal(self, server_round: int, site: str, arrays: list[np.ndarray], reference: list[np.ndarray],
                 result: FitRes) -> str | None:
        key = self.keys.get(site)
        signed = payload(arrays, result.num_examples, result.metrics.get("epsilon_spent"))
        if key is None or not verify(key, server_round, "fit", signed, str(result.metrics.get("signature", ""))):
            return "unknown site or wrong signature"
        if sum(a.nbytes for a in arrays) > self.max_weights_bytes:
            return f"{sum(a.nbytes for a in arrays)} bytes, over the bound of {self.max_weights_bytes}"
        if [(a.shape, a.dtype) for a in arrays] != [(a.shape, a.dtype) for a in reference]:
            return "not the global adapter's tensors (shapes or types differ)"
        if not all(np.isfinite(a).all() for a in arrays):
            return "NaN or infinite weights"
        if result.num_examples < 0:
            return "a negative example count"
        return None

    # -- evaluate -----------------------------------------------------------------------------
    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: ClientManager
                           ) -> list[tuple[ClientProxy, flwr.common.EvaluateIns]]:
        if self.candidate is None:
            return []
        evaluate = flwr.common.EvaluateIns(self.candidate, {"round": server_round})
        return [(client, evaluate) for client in self._everyone(client_manager, self.quorum)]

    def aggregate_evaluate(self, server_round: int, results: list[tuple[ClientProxy, flwr.common.EvaluateRes]],
                           failures: list[tuple[ClientProxy, flwr.common.EvaluateRes] | BaseException]
                           ) -> tuple[float | None, dict[str, Scalar]]:
        sites, refused, unable = [], {}, {}
        for _, result in results:
            site, scores = str(result.metrics.get("site", "?")), str(result.metrics.get("scores", ""))
            key = self.keys.get(site)
            if key is None or not verify(key, server_round, "evaluate", scores.encode(),
                                         str(result.metrics.get("signature", ""))):
                refused[site] = "unknown site or wrong signature"
                continue
            if not scores:  # the site could not evaluate (it did not train this round, say)
                unable[site] = str(result.metrics.get("reason", ""))
                continue
            try:
                sites.append(SiteScores.model_validate_json(scores).model_copy(update={"site": site}))
            except ValueError as exc:
                refused[site] = f"scores that do not parse: {str(exc)[:200]}"
        self.entry |= {"evaluated": {s.site: {"probes": s.probes, "own_verdict": s.verdict} for s in sites},
                       "not_evaluated": unable, "evaluation_refused": refused,
                       "evaluate_failures": [_failure(f) for f in failures]}
        if len(sites) < self.quorum:
            self.entry["outcome"] = (f"not promoted: {len(sites)} sites' evaluations, below the quorum of "
                                     f"{self.quorum}")
            self._write()
            return None, {"promoted": False}
        report = judge_pooled(sites, self.policy)
        self.entry |= {"outcome": f"{'promoted' if report.passed else 'rejected'}: {report.reason}",
                       "gate": json.loads(report.model_dump_json())}
        LOG.info("round %d: %s", server_round, self.entry["outcome"])
        if report.passed:
            self.global_parameters = self.candidate
            self.adoption = {"adopt_round": server_round, "adopt_gate": report.model_dump_json()}
        self._write()
        pooled = list(report.candidate.values())
        return (1 - sum(s.accuracy * s.n for s in pooled) / max(1, sum(s.n for s in pooled)),
                {"promoted": report.passed})

    def _write(self) -> None:
        self.entry["finished_at"] = time.time()
        with (self.out_dir / ROUNDS_LOG).open("a") as log:
            log.write(json.dumps(self.entry) + "\n")


def _failure(failure: object) -> str:
    return repr(failure)[:300] if isinstance(failure, BaseException) else "a result the site marked failed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--address", default="127.0.0.1:8080", help="Where the hub listens, host:port.")
    parser.add_argument("--sites", type=Path, required=True, help="JSON file: each site's name and key.")
    parser.add_argument("--rounds", type=int, default=3, help="Rounds that train (one more delivers).")
    parser.add_argument("--quorum", type=int, default=2, help="Fewest sites a round's candidate and its "
                                                              "evaluation need.")
    parser.add_argument("--wait-for", type=int, help="Sites connected before a round starts (default: the "
                                                     "quorum); every site connected then takes part.")
    parser.add_argument("--gate", default="{}", help="The gate's settings, JSON (`gate` of the settings tree).")
    parser.add_argument("--max-weights-bytes", type=int, default=64 * 1024 * 1024)
    parser.add_argument("--round-timeout", type=float, default=3600.0, help="Seconds a round waits for sites.")
    parser.add_argument("--out", type=Path, default=Path("federation"), help="Where the hub writes its log.")
    parser.add_argument("--certificates", nargs=3, type=Path, metavar=("CA", "CERT", "KEY"),
                        help="PEM files of the hub's TLS; none: plain gRPC (loopback and tests only).")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("flwr").propagate = False  # Flower prints its own lines
    keys = json.loads(args.sites.read_text())
    if not isinstance(keys, dict) or not all(isinstance(v, str) and len(v) >= 16 for v in keys.values()):
        raise SystemExit(f"{args.sites}: a JSON object of site name to key (at least 16 characters)")
    if not 1 <= args.quorum <= len(keys):
        raise SystemExit(f"--quorum {args.quorum} must be between 1 and the {len(keys)} sites")
    args.out.mkdir(parents=True, exist_ok=True)
    strategy = GatedFedAvg(keys, args.rounds, args.quorum, GateSettings.model_validate_json(args.gate),
                           args.max_weights_bytes, args.out, args.wait_for)
    certificates = tuple(p.read_bytes() for p in args.certificates) if args.certificates else None
    flwr.server.start_server(server_address=args.address, strategy=strategy, certificates=certificates,
                             config=flwr.server.ServerConfig(num_rounds=args.rounds + 1,
                                                             round_timeout=args.round_timeout),
                             grpc_max_message_length=2 * args.max_weights_bytes + 64 * 1024 * 1024)


if __name__ == "__main__":
    main()
