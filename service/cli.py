"""The `evergreen` command line."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from service.settings import DEV_ADMIN_KEY, Settings, masked, use_config_file
from service.settings_doc import reference

app = typer.Typer(help="Evergreen: keep a live model adapted to a ticket stream without forgetting.",
                  no_args_is_help=True)
config_app = typer.Typer(help="Inspect the settings.", no_args_is_help=True)
model_app = typer.Typer(help="Prepare base models.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(model_app, name="model")
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


def _banner(settings: Settings) -> None:
    api = settings.api
    console.print(f"[bold green]Evergreen[/] API on http://{api.host}:{api.port}  "
                  f"(docs: /docs, metrics: /metrics)")
    if any(k.key.get_secret_value() == DEV_ADMIN_KEY for k in api.keys):
        console.print(f"development admin key: [bold]{DEV_ADMIN_KEY}[/]")


@app.command()
def serve(replica: Annotated[bool, typer.Option(
        "--replica", help="Serve only: follow the primary's promotions (same as `replicas.role = replica`).")] = False
          ) -> None:
    """Run the service (ingester, scheduler, API) against `kafka.bootstrap`."""
    from service.core import Service
    from service.server import run_server

    settings = Settings()
    if replica:
        settings.replicas.role = "replica"
    _banner(settings)
    run_server(Service(settings))


@app.command()
def up() -> None:
    """Run everything: a local broker unless `kafka.bootstrap` is set, the service, the demo stream."""
    from service.server import run_up

    settings = Settings()
    _banner(settings)
    run_up(settings)


@app.command()
def produce(
    source: Annotated[str, typer.Argument(help="A JSONL file, or a data set: banking77, clinc150, hwu64, mcid.")],
    order: Annotated[str, typer.Option(help="random or class-incremental.")] = "class-incremental",
    windows: Annotated[int, typer.Option(help="Windows of new intents (JSONL: labels split into N windows).")] = 3,
    intents_per_window: Annotated[int, typer.Option(help="New intents per window.")] = 4,
    per_intent: Annotated[Optional[int], typer.Option(help="Tickets per intent (default: all).")] = None,  # noqa: UP045
    rate: Annotated[Optional[float], typer.Option(help="Tickets per second (default: as fast as possible).")] = None,  # noqa: UP045
    seed: Annotated[int, typer.Option(help="Seed of the order.")] = 0,
) -> None:
    """Stream tickets to the `kafka.topic` topic."""
    from streams.produce import TicketProducer, source_values

    settings = Settings()
    if not settings.kafka.bootstrap:
        raise typer.BadParameter("set EVERGREEN_KAFKA_BOOTSTRAP (or kafka.bootstrap) to produce")
    try:
        values = source_values(source, order=order, windows=windows,  # type: ignore[arg-type]
                               intents_per_window=intents_per_window, per_intent=per_intent, seed=seed)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    producer = TicketProducer(settings.kafka.bootstrap, settings.kafka.topic)
    with Progress(TextColumn("producing"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console) as bar:
        task = bar.add_task("produce", total=len(values))
        for chunk in range(0, len(values), 100):
            producer.send_all(values[chunk:chunk + 100], rate=rate)
            bar.update(task, advance=len(values[chunk:chunk + 100]))
    producer.close()
    console.print(f"sent {len(values)} tickets to {settings.kafka.topic}")


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
    runpy.run_path(str(script), run_name="__main__")
