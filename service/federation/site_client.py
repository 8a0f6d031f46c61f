"""A site's Flower client: the hub's instructions, forwarded to the site's service.

`python -m service.federation.site_client` in `.venv-fed`, started by `evergreen federate site`.
Each instruction becomes one call to the site's `/v1/federation` API (`service.routes.federation`):

- fit: first adopt the candidate the hub's gate passed last round, if the hub says so (the
  parameters it sends are that candidate); then train the site's new window from them, unless the
  round only delivers. A site with nothing to learn, or whose privacy budget is spent, answers
  with no examples and its reason, and the hub leaves it out of the average;
- evaluate: gate the hub's candidate on the site's probes; the per-probe results go back.

Every result carries the site's name and its signature with the federation key (`wire.sign`).
A site that cannot do what a round asks (its service refuses or does not answer) says why in its
result rather than raising: with Flower's gRPC transport a client that raises ends its process.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import socket
import time

import flwr
import httpx
import numpy as np
from flwr.client import NumPyClient

from service.federation.wire import FEDERATION_KEY_ENV, SITE_API_KEY_ENV, payload, sign, to_arrays, to_safetensors

LOG = logging.getLogger("evergreen.site")
ROUND_TIMEOUT_S = 3600.0  # a fit of a large window on a CPU


class SiteClient(NumPyClient):
    def __init__(self, name: str, service_url: str, api_key: str, federation_key: str) -> None:
        self.name = name
        self.key = federation_key
        self.http = httpx.Client(base_url=service_url.rstrip("/"), timeout=ROUND_TIMEOUT_S,
                                 headers={"Authorization": f"Bearer {api_key}"})
        self.names: list[str] = []  # the adapter's tensor names, in the arrays' order

    def _post(self, path: str, weights: bytes | None = None, json: object = None) -> httpx.Response:
        """The service's answer; a 503 of our own making when it does not answer at all."""
        try:
            if weights is not None:
                return self.http.post(path, content=weights, headers={"Content-Type": "application/octet-stream"})
            return self.http.post(path, json=json)
        except httpx.HTTPError as exc:
            return httpx.Response(503, text=f"the site's service did not answer: {exc!r}")

    def get_parameters(self, config: dict[str, object]) -> list[np.ndarray]:
        try:
            answer = self.http.get("/v1/federation/weights")
            answer.raise_for_status()
        except httpx.HTTPError as exc:  # the hub starts from the adapter most other sites hold
            LOG.warning("%s: no live adapter to send: %r", self.name, exc)
            return []
        self.names, arrays = to_arrays(answer.content)
        LOG.info("%s: the live version %s is the hub's first global adapter", self.name,
                 answer.headers.get("X-Evergreen-Version"))
        return arrays

    def fit(self, parameters: list[np.ndarray], config: dict[str, object]
            ) -> tuple[list[np.ndarray], int, dict[str, object]]:
        round_number = int(config["round"])  # type: ignore[call-overload]
        if not self.names:
            self.get_parameters({})
        weights = to_safetensors(self.names, parameters)
        if "adopt_round" in config:
            adopted = self._post(f"/v1/federation/rounds/{config['adopt_round']}/adopt",
                                 json={"weights": base64.b64encode(weights).decode(),
                                       "gate": json.loads(str(config["adopt_gate"]))})
            LOG.log(logging.INFO if adopted.status_code == 200 else logging.WARNING,
                    "%s: adopting round %s's candidate: %s %s", self.name, config["adopt_round"],
                    adopted.status_code, adopted.text[:300])
        if not config.get("train", True):
            return self._fit_result(round_number, parameters, 0, "the round only delivers the last promotion", 0.0)
        answer = self._post(f"/v1/federation/rounds/{round_number}/fit", weights=weights)
        if answer.status_code != 200:
            return self._fit_result(round_number, parameters, 0, f"{answer.status_code}: {answer.text[:500]}", 0.0)
        reply = answer.json()
        trained = parameters
        if reply["examples"]:
            names, trained = to_arrays(base64.b64decode(reply["weights"]))
            if names != self.names:
                raise ValueError("the site trained an adapter of other tensors than the hub's")
        LOG.info("%s: round %d: %d examples, windows %s, ε spent %.3f: %s", self.name, round_number,
                 reply["examples"], reply["windows"], reply["epsilon_spent"], reply["reason"])
        return self._fit_result(round_number, trained, reply["examples"], reply["reason"], reply["epsilon_spent"])

    def _fit_result(self, round_number: int, arrays: list[np.ndarray], examples: int, reason: str,
                    epsilon_spent: float) -> tuple[list[np.ndarray], int, dict[str, object]]:
        signature = sign(self.key, round_number, "fit", payload(arrays, examples, epsilon_spent))
        return arrays, examples, {"site": self.name, "signature": signature, "reason": reason,
                                  "epsilon_spent": epsilon_spent}

    def evaluate(self, parameters: list[np.ndarray], config: dict[str, object]
                 ) -> tuple[float, int, dict[str, object]]:
        round_number = int(config["round"])  # type: ignore[call-overload]
        if not self.names:
            self.get_parameters({})
        answer = self._post(f"/v1/federation/rounds/{round_number}/evaluate",
                            weights=to_safetensors(self.names, parameters))
        scores = answer.text if answer.status_code == 200 else ""  # none: the hub counts the site out
        if not scores:
            LOG.warning("%s: round %d not evaluated: %s %s", self.name, round_number, answer.status_code,
                        answer.text[:500])
        return 0.0, 1, {"site": self.name, "scores": scores, "reason": f"{answer.status_code}: {answer.text[:500]}",
                        "signature": sign(self.key, round_number, "evaluate", scores.encode())}


def wait_for_hub(address: str, timeout: float) -> None:
    """Return once the hub accepts connections: Flower's client gives up at the first refusal."""
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
            return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise SystemExit(f"the hub at {address} did not answer in {timeout:g} s: {exc}") from exc
            time.sleep(1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hub", required=True, help="The hub's address, host:port.")
    parser.add_argument("--name", required=True, help="This site's name, as the hub's sites file has it.")
    parser.add_argument("--service", required=True, help="This site's Evergreen service, http://host:port.")
    parser.add_argument("--connect-timeout", type=float, default=600.0, help="Seconds to wait for the hub.")
    parser.add_argument("--root-certificate", help="CA certificate (PEM) of the hub's TLS; none: plain gRPC.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("flwr").propagate = False  # Flower prints its own lines
    key, api_key = os.environ.get(FEDERATION_KEY_ENV), os.environ.get(SITE_API_KEY_ENV)
    if not key or not api_key:
        raise SystemExit(f"{FEDERATION_KEY_ENV} and {SITE_API_KEY_ENV} must be set")
    client = SiteClient(args.name, args.service, api_key, key)
    certificate = open(args.root_certificate, "rb").read() if args.root_certificate else None
    wait_for_hub(args.hub, args.connect_timeout)
    flwr.client.start_client(server_address=args.hub, client=client.to_client(), root_certificates=certificate,
                             insecure=certificate is None)


if __name__ == "__main__":
    main()
