"""`evergreen federate hub|site`: the hub and a site's client, started in `.venv-fed`.

These commands run in the service's environment, read the one settings tree (the gate's
settings for the hub, the service's address and admin key for a site) and replace themselves
with the Flower process in the federation's environment, which `make federation` builds.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from service.federation.wire import FEDERATION_KEY_ENV, SITE_API_KEY_ENV
from service.settings import Settings

PYTHON_ENV = "EVERGREEN_FEDERATION_PYTHON"  # the federation environment's interpreter, if not `.venv-fed`
app = typer.Typer(help="Federated adaptation across sites on Flower (`make federation` builds its environment).",
                  no_args_is_help=True)


def federation_python() -> str:
    default = Path(__file__).resolve().parents[2] / ".venv-fed" / "bin" / "python"
    python = Path(os.environ.get(PYTHON_ENV) or default)
    if not python.exists():
        raise typer.BadParameter(f"the federation's environment is not built ({python} is missing): run "
                                 f"`make federation`, or set {PYTHON_ENV}")
    return str(python)


@app.command()
def hub(
    sites: Annotated[Path, typer.Option(help="JSON file: each site's name and its key (16+ characters).",
                                        exists=True, dir_okay=False)],
    address: Annotated[str, typer.Option(help="Where the hub listens, host:port.")] = "127.0.0.1:8080",
    rounds: Annotated[int, typer.Option(min=1, help="Rounds that train; one more delivers the last promotion.")] = 3,
    quorum: Annotated[int, typer.Option(min=1, help="Fewest sites whose adapters make a candidate, and whose "
                                                    "evaluations may promote it.")] = 2,
    wait_for: Annotated[Optional[int], typer.Option(min=1, help="Sites connected before a round starts "  # noqa: UP045
                                                               "(default: the quorum).")] = None,
    out: Annotated[Path, typer.Option(help="The hub's directory: its log, `rounds.jsonl`.")] = Path("federation"),
    round_timeout: Annotated[float, typer.Option(help="Seconds a round's fit or evaluation waits for sites.")] = 3600.0,
    certificates: Annotated[Optional[list[Path]], typer.Option(  # noqa: UP045
        help="The hub's TLS: three PEM files, CA, certificate, key (without: plain gRPC, for loopback).")] = None,
) -> None:
    """Run the hub: FedAvg over the sites' adapters, promoted only through the gate on every site's probes."""
    settings = Settings()
    python = federation_python()
    args = [python, "-m", "service.federation.hub", "--sites", str(sites), "--address", address,
            "--rounds", str(rounds), "--quorum", str(quorum), "--out", str(out), "--round-timeout", str(round_timeout),
            "--gate", settings.gate.model_dump_json(),
            "--max-weights-bytes", str(settings.federation.max_weights_bytes)]
    if wait_for is not None:
        args += ["--wait-for", str(wait_for)]
    if certificates:
        if len(certificates) != 3:
            raise typer.BadParameter("--certificates takes three files: CA, certificate, key")
        args += ["--certificates", *map(str, certificates)]
    os.execv(python, args)


@app.command()
def site(
    hub: Annotated[str, typer.Option(help="The hub's address, host:port.")],
    name: Annotated[str, typer.Option(help="This site's name, as the hub's sites file has it.")],
    url: Annotated[Optional[str], typer.Option(help="This site's service (default: `api.host`, `api.port`).")] = None,  # noqa: UP045
    key: Annotated[Optional[str], typer.Option(help="Admin API key of the service (default: the first in "  # noqa: UP045
                                                    "`api.keys`).")] = None,
    root_certificate: Annotated[Optional[Path], typer.Option(help="CA certificate (PEM) of the hub's TLS.")] = None,  # noqa: UP045
) -> None:
    """Join the hub with a running service: its Flower client forwards each round to the service.

    The key shared with the hub is read from `EVERGREEN_FEDERATION_KEY`, never from the command line.
    """
    from service.cli import _admin_key, _service_url  # the main CLI imports this module

    settings = Settings()
    if not os.environ.get(FEDERATION_KEY_ENV):
        raise typer.BadParameter(f"set {FEDERATION_KEY_ENV} to the key the hub's sites file has for {name!r}")
    python = federation_python()
    args = [python, "-m", "service.federation.site_client", "--hub", hub, "--name", name,
            "--service", url or _service_url(settings)]
    if root_certificate is not None:
        args += ["--root-certificate", str(root_certificate)]
    os.execve(python, args, {**os.environ, SITE_API_KEY_ENV: key or _admin_key(settings)})
