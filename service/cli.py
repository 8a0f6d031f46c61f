"""The `evergreen` command line."""

from __future__ import annotations

import datetime
import functools
import json
import logging
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

from service.export_config import ExportFormat, Quant
from service.federation.launch import app as federate_app
from service.settings import DEV_ADMIN_KEY, Settings, masked, use_config_file
from service.settings_doc import reference

app = typer.Typer(help="Evergreen: keep a live model adapted to a ticket stream without forgetting.",
                  no_args_is_help=True)
config_app = typer.Typer(help="Inspect the settings.", no_args_is_help=True)
model_app = typer.Typer(help="Prepare base models.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(model_app, name="model")
app.add_typer(federate_app, name="federate")
console = Console(stderr=True)


@app.callback()
def main(config: Annotated[Optional[Path], typer.Option(help="TOML settings file.")] = None,  # noqa: UP045
         verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("kafka", "httpx", "apscheduler.executors", "sentence_transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if config is not None:
        use_config_file(config)


@config_app.command("show")
def config_show() -> None:
    """Print the effective settings (defaults < config file < EVERGREEN_* env), secrets masked."""
    typer.echo(json.dumps(masked(Settings()), indent=2))


@config_app.command("reference")
def config_reference() -> None:
    """Print the reference of every setting as markdown (the source of docs/settings.md)."""
    typer.echo(reference(), nl=False)


@model_app.command("prepare")
def model_prepare(base: Annotated[Optional[str], typer.Argument(help="Base model; default: `model.base`.")] = None  # noqa: UP045
                  ) -> None:
    """Convert the base model into the cache (once) and print its directory."""
    from learners.base_model import resolve_base_model

    settings = Settings()
    with console.status(f"preparing {base or settings.model.base} …"):
        path = resolve_base_model(base or settings.model.base, settings.model.cache_dir)
    typer.echo(str(path))


def _say(line: str) -> None:
    """An event line of the loop, on the terminal (markup in tickets is printed as it is)."""
    console.print(line, markup=False, highlight=False)


def _banner(settings: Settings) -> None:
    api = settings.api
    console.print(f"[bold green]Evergreen[/] API on http://{api.host}:{api.port}  "
                  f"(console: /, docs: /docs, metrics: /metrics)")
    if any(k.key.get_secret_value() == DEV_ADMIN_KEY for k in api.keys):
        console.print(f"development admin key: [bold]{DEV_ADMIN_KEY}[/]")


@app.command()
def serve(replica: Annotated[bool, typer.Option(
        "--replica", help="Serve only: follow the primary's promotions (same as `replicas.role = replica`).")] = False
          ) -> None:
    """Run the service (ingester, scheduler, API) against `kafka.bootstrap`."""
    from service.core import Service
    from service.narrator import Narrator
    from service.server import run_server

    settings = Settings()
    if replica:
        settings.replicas.role = "replica"
    _check_placement(settings)
    _banner(settings)
    service = Service(settings)
    run_server(service, Narrator(service, _say))


@app.command()
def up() -> None:
    """Run everything: a local broker unless `kafka.bootstrap` is set, the service, the demo stream."""
    from service.server import run_up

    started = time.monotonic()
    settings = Settings()
    _check_placement(settings)
    _banner(settings)
    run_up(settings, _say, started)


def _check_placement(settings: Settings) -> None:
    """Refuse to start, naming the setting, on a machine without the device or precision asked for."""
    from learners.placement import PlacementError
    from service.core import placements

    try:
        serving, training = placements(settings)
    except PlacementError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    console.print(f"model {settings.model.base} served on {serving.device} in {serving.precision}"
                  + ("" if training == serving else f", trained on {training.device}"))


@app.command()
def produce(
    source: Annotated[str, typer.Argument(
        help="A JSONL file, or a data set: banking77, clinc150, hwu64, mcid, stackoverflow, trec, xtopic, ecdt.")],
    order: Annotated[str, typer.Option(help="random or class-incremental.")] = "class-incremental",
    windows: Annotated[int, typer.Option(help="Windows of new intents (JSONL: labels split into N windows).")] = 3,
    intents_per_window: Annotated[int, typer.Option(help="New intents per window.")] = 4,
    per_intent: Annotated[Optional[int], typer.Option(help="Tickets per intent (default: all).")] = None,  # noqa: UP045
    rate: Annotated[Optional[float], typer.Option(help="Tickets per second (default: as fast as possible).")] = None,  # noqa: UP045
    seed: Annotated[int, typer.Option(help="Seed of the order.")] = 0,
) -> None:
    """Stream tickets to the `kafka.topic` topic."""
    from streams.broker import announced_broker
    from streams.produce import TicketProducer, source_values

    settings = Settings()
    bootstrap = settings.kafka.bootstrap or announced_broker(settings.data_dir)
    if bootstrap is None:
        raise typer.BadParameter("no broker: set EVERGREEN_KAFKA_BOOTSTRAP (or kafka.bootstrap), or start "
                                 "`evergreen up` with the same data directory, whose local broker is found")
    try:
        values = source_values(source, order=order, windows=windows,  # type: ignore[arg-type]
                               intents_per_window=intents_per_window, per_intent=per_intent, seed=seed)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    producer = TicketProducer(bootstrap, settings.kafka.topic)
    with Progress(TextColumn("producing"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console) as bar:
        task = bar.add_task("produce", total=len(values))
        for chunk in range(0, len(values), 100):
            producer.send_all(values[chunk:chunk + 100], rate=rate)
            bar.update(task, advance=len(values[chunk:chunk + 100]))
    producer.close()
    console.print(f"sent {len(values)} tickets to {settings.kafka.topic} on {bootstrap}")


# Exit status of `evergreen update` by the update's outcome.
UPDATE_EXIT = {"promoted": 0, "skipped": 0, "rejected": 1, "failed": 2, "cancelled": 3}


def _service_url(settings: Settings) -> str:
    host = settings.api.host
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{settings.api.port}"


def _admin_key(settings: Settings) -> str:
    key = next((k for k in settings.api.keys if "admin" in k.scopes), None)
    if key is None:
        raise typer.BadParameter("no key with the `admin` scope in `api.keys`: pass --key")
    return key.key.get_secret_value()


@app.command()
def update(
    url: Annotated[Optional[str], typer.Option(help="The service (default: `api.host`, `api.port`).")] = None,  # noqa: UP045
    key: Annotated[Optional[str], typer.Option(help="Admin API key (default: the first in `api.keys`).")] = None,  # noqa: UP045
    poll: Annotated[float, typer.Option(help="Seconds between progress reads.")] = 0.5,
) -> None:
    """Start an update on a running service and follow it to its verdict; Ctrl-C cancels it.

    Follows the running update instead when one is under way. Exit status: 0 promoted or
    skipped, 1 rejected, 2 failed, 3 cancelled.
    """
    settings = Settings()
    headers = {"Authorization": f"Bearer {key or _admin_key(settings)}"}
    with httpx.Client(base_url=url or _service_url(settings), headers=headers, timeout=30) as client:
        started = client.post("/v1/updates")
        if started.status_code == 409:
            running = next((u for u in client.get("/v1/updates").json() if u["status"] == "running"), None)
            if running is None:
                console.print("an update was running and has just finished: run the command again")
                raise typer.Exit(2)
            console.print(f"an update is already running: following update {running['id']}")
        elif started.status_code != 202:
            console.print(f"[red]{started.status_code}[/]: {started.json().get('detail', started.text)}")
            raise typer.Exit(2)
        else:
            running = started.json()
        record = _follow(client, running["id"], poll)
    version = f" {record['version']}" if record["version"] else ""
    typer.echo(f"update {record['id']} {record['status']}{version}: {record['reason']}")
    raise typer.Exit(UPDATE_EXIT[record["status"]])


def _follow(client: httpx.Client, update_id: int, poll: float) -> dict[str, Any]:
    """Poll an update into a progress bar until it ends; the first Ctrl-C asks the service to cancel it.

    Ctrl-C only raises a flag that the loop reads between requests: a KeyboardInterrupt raised
    inside a request would leave the HTTP client's connection pool half-used, and the cancel
    request after it could wait on it. A second Ctrl-C leaves at once.
    """
    columns = (TextColumn("update {task.fields[id]}: {task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]} tok/s"),
               TextColumn("ETA {task.fields[eta]}"))
    interrupted = threading.Event()

    def on_ctrl_c(signum: int, frame: object) -> None:
        if interrupted.is_set():
            raise KeyboardInterrupt
        interrupted.set()

    previous = signal.signal(signal.SIGINT, on_ctrl_c)
    cancelling = False
    try:
        with Progress(*columns, console=console) as bar:
            task = bar.add_task("preparing", total=None, id=update_id, loss="-", speed="-", eta="-")
            while True:
                if interrupted.is_set() and not cancelling:
                    cancelling = True
                    client.post(f"/v1/updates/{update_id}/cancel")  # 409 if it ended meanwhile: shown next poll
                record: dict[str, Any] = client.get(f"/v1/updates/{update_id}").raise_for_status().json()
                _show(bar, task, record, cancelling)
                if record["status"] != "running":
                    return record
                time.sleep(poll)
    finally:
        signal.signal(signal.SIGINT, previous)


def _show(bar: Progress, task: TaskID, record: dict[str, Any], cancelling: bool) -> None:
    p = record["progress"] or {}
    eta = p.get("eta_s")
    stage = record["stage"]
    if stage == "searching" and p.get("trial"):
        stage = f"searching: trial {p['trial']}/{p['trials']}"
    bar.update(task, description="cancelling" if cancelling else stage,
               completed=p.get("step", 0), total=p.get("steps"),
               loss=f"{p['loss']:.4f}" if p.get("loss") is not None else "-",
               speed=f"{p['tokens_per_s']:,.0f}" if "tokens_per_s" in p else "-",
               eta=str(datetime.timedelta(seconds=round(eta))) if eta is not None else "-")


@app.command("export")
def export_version(
    version: Annotated[str, typer.Argument(help="A registry version (`v0003`) or `live`.")],
    file_format: Annotated[ExportFormat, typer.Option("--format", help="File format.")] = "gguf",
    quant: Annotated[Quant, typer.Option(help="Weight type (an adapter: f16 or q8_0); vectors stay f32.")] = "q8_0",
    adapter_only: Annotated[bool, typer.Option(
        "--adapter-only", help="The LoRA adapter alone, for llama.cpp's `--lora` on the base model's GGUF.")] = False,
    out: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        help="File to write (default: evergreen-VERSION-QUANT.gguf here).")] = None,
) -> None:
    """Write a version as a GGUF file for llama.cpp and ollama: merged into the base model as it is
    served, or its LoRA adapter alone. Reads the registry directly (no running service needed);
    the export is cached in the registry, so a second one is a copy."""
    from learners.base_model import load_base, resolve_base_model
    from service.export import Exporter, ExportError, atomic_write, base_gguf
    from service.merge import UnsafeAdapter
    from service.registry import AdapterRegistry, RegistryError

    settings = Settings()
    root = settings.registry_dir or settings.data_dir / "registry"
    if not (root / "versions").is_dir():
        raise typer.BadParameter(f"no adapter registry at {root} (`data_dir`, `registry_dir`)")
    base_path = resolve_base_model(settings.model.base, settings.model.cache_dir)
    exporter = Exporter(AdapterRegistry(root, writer=False),  # never clean up a draft the service is writing
                        functools.cache(lambda: load_base(base_path)[0]), base_path, base_gguf(settings.model))
    try:
        with console.status(f"exporting {version} ({quant}) …"):
            exported = exporter.export(version, quant, adapter_only)
    except (RegistryError, ExportError, UnsafeAdapter) as exc:
        console.print(f"cannot export {version}: {exc}", markup=False, highlight=False, style="red")
        raise typer.Exit(1) from exc
    target = out or Path(exported.filename)
    sha256 = atomic_write(target, lambda tmp: shutil.copyfile(exported.path, tmp))
    if sha256 != exported.sha256:
        console.print(f"the copy at {target} differs from the registry's export {exported.path}", style="red")
        raise typer.Exit(1)
    typer.echo(f"{target}\t{exported.version}\t{exported.size} bytes\tsha256 {sha256}")
    run = f"llama-cli -m BASE.gguf --lora {target}" if adapter_only else f"llama-cli -m {target}"
    console.print(f"run it: {run}", markup=False, highlight=False)


BENCHMARKS = Path(__file__).resolve().parents[1] / "bench"


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(ctx: typer.Context,
          name: Annotated[str, typer.Argument(help="cl, buffer, ingest, scoring, serve, train, ...")]) -> None:
    """Run a benchmark of the checkout's bench/ folder; its own options follow (`... -- --help`)."""
    import runpy
    import sys

    script = BENCHMARKS / f"{name}.py"
    if not script.is_file():
        known = ", ".join(sorted(p.stem for p in BENCHMARKS.glob("*.py"))) or "none (not a checkout)"
        raise typer.BadParameter(f"no benchmark {name!r}; known: {known}")
    sys.argv = [str(script), *ctx.args]
    # As `python bench/NAME.py` run in the checkout finds them: sibling scripts, then `bench.*` modules.
    sys.path[:0] = [str(BENCHMARKS), str(BENCHMARKS.parent)]
    runpy.run_path(str(script), run_name="__main__")
