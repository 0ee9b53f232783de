"""The ``flywheel`` command line (typer for commands, rich for output)."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import orjson
import typer
from rich.console import Console
from rich.table import Table

from engine.app import Engine, projection_path
from engine.bus import Bus, BusUnavailable, PublishFailed
from engine.config import ConfigError, Settings, load_settings
from engine.connection import open_bus, running_embedded_url, start_embedded
from engine.embedded import EmbeddedServerError
from engine.plugin_host import PluginError, PluginHost
from engine.projection import ProjectionRunner
from engine.recorder import events_from_jsonl
from engine.replay import differences, rebuild
from schemas import InvalidEvent, new_id, parse_event

app = typer.Typer(help="Flywheel: a continuous-learning engine for coding agents.", no_args_is_help=True)
config_app = typer.Typer(help="Inspect the configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")
console = Console()
err = Console(stderr=True)
T = TypeVar("T")


def _settings() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


def _run(coro: Callable[[], Awaitable[T]]) -> T:
    """Run a command's coroutine; turn the errors a user can fix into one clear line."""
    try:
        return asyncio.run(coro())  # type: ignore[arg-type]
    except (BusUnavailable, PublishFailed, EmbeddedServerError, ConfigError, PluginError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


# --------------------------------------------------------------------------- up


@app.command()
def up(
    only: Annotated[list[str] | None, typer.Option(
        help="run only these processors/projections (and the gateway only when named: --only gateway)")] = None,
    duration: Annotated[float | None, typer.Option(help="stop after this many seconds")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run the engine: every enabled plugin; an embedded NATS when no URL is configured."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    settings = _settings()

    async def main() -> None:
        from engine import telemetry

        telemetry.configure(settings.telemetry)
        server = None
        url = settings.nats.url or running_embedded_url(settings)
        if url is None:
            server = start_embedded(settings)
            url = server.url
        try:
            bus = await Bus.connect(settings, url)
            await bus.ensure_streams()
            engine = Engine(bus, PluginHost(settings), only=set(only) if only else None)
            engine.prepare()
            stop = stop_event(duration)
            console.print(
                f"[bold]flywheel up[/bold] on {url}{' (embedded)' if server else ''}: "
                f"{len(engine.workers)} processors "
                f"({', '.join(w.processor.name for w in engine.workers) or '-'}), "
                f"{len(engine.runners)} projections "
                f"({', '.join(r.projection.name for r in engine.runners) or '-'}). Ctrl-C stops."
            )
            from engine.dashboard.server import start_dashboard

            dashboard = await start_dashboard(settings, bus, warn=err.print)
            if dashboard is not None:
                console.print(f"dashboard: {dashboard.url}")
            gateway = await _start_gateway(settings) if not only or "gateway" in only else None
            if gateway is not None:
                console.print(f"gateway: {gateway.url} (OpenAI and Anthropic APIs; ask for a role, e.g. 'coder')")
            try:
                await engine.run(stop)
            finally:
                if gateway is not None:
                    await gateway.stop()
                if dashboard is not None:
                    await dashboard.stop()
            await bus.close()
            console.print("stopped: in-flight work drained")
        finally:
            if server is not None:
                server.stop()

    _run(main)


async def _start_gateway(settings: Settings) -> Any:
    """The running gateway for ``flywheel up``, or None when ``gateway.enabled`` is false or it cannot listen
    (the engine runs on without it, as without the dashboard). Until plugins register services, up starts it."""
    if not settings.gateway.enabled:
        return None
    from plugins.gateway.service import GatewayServer, GatewayUnavailable

    server = GatewayServer(settings, warn=lambda line: err.print(f"[yellow]{line}[/yellow]"), freeze_heap=True)
    try:
        await server.start()
    except GatewayUnavailable as exc:
        err.print(f"[yellow]warning:[/yellow] no gateway: {exc}")
        await server.gateway.close()
        return None
    return server


# --------------------------------------------------------------------------- record


@app.command()
def record(
    file: Annotated[str, typer.Argument(help="a JSON event, a JSON array, or JSON lines; - for stdin")] = "-",
) -> None:
    """Validate events and publish them. Missing id, time and source are filled in."""
    settings = _settings()
    data = sys.stdin.buffer.read() if file == "-" else Path(file).read_bytes()
    try:
        raws = events_from_jsonl(data)
    except orjson.JSONDecodeError as exc:
        err.print(f"[red]error:[/red] {file}: not JSON: {exc}")
        raise typer.Exit(2) from None
    events, problems = [], []
    for i, raw in enumerate(raws, 1):
        if isinstance(raw, dict):
            raw.setdefault("id", new_id())
            raw.setdefault("time", datetime.now().astimezone().isoformat())
            raw.setdefault("source", "cli")
            if "schema_version" not in raw and isinstance(raw.get("type"), str):
                raw["schema_version"] = 1
        try:
            events.append(parse_event(raw))
        except InvalidEvent as exc:
            problems.append(f"event {i}: {exc.reason}")
    if problems:
        for p in problems:
            err.print(f"[red]invalid[/red] {p}")
        err.print("nothing was published")
        raise typer.Exit(1)

    async def main() -> None:
        async with open_bus(settings) as bus:
            await bus.publish_many(events)

    _run(main)
    for e in events:
        console.print(f"recorded {e.type} {e.id}")


# --------------------------------------------------------------------------- events


def _event_row(seq: int, event: Any) -> list[str]:
    data = event.data
    role = getattr(data, "role", None) or getattr(getattr(data, "interaction", None), "role", None) or ""
    summary = orjson.dumps(data.model_dump(mode="json")).decode()
    return [str(seq), event.time.strftime("%Y-%m-%d %H:%M:%S"), event.type, role, event.source,
            event.correlation_id or "", summary[:80]]


@app.command()
def events(
    type: Annotated[list[str] | None, typer.Option("--type", "-t", help="event type(s)")] = None,
    role: Annotated[str | None, typer.Option(help="only events of this role")] = None,
    correlation: Annotated[str | None, typer.Option(help="only this interaction or run")] = None,
    stream: Annotated[str, typer.Option(help="log or raw")] = "log",
    last: Annotated[int, typer.Option(help="show the last N matching events")] = 50,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing new events")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON event per line")] = False,
) -> None:
    """List or follow the log, filtered by type, role or correlation id."""
    settings = _settings()
    if stream not in ("log", "raw"):
        err.print("[red]error:[/red] --stream is log or raw")
        raise typer.Exit(2)

    def keep(event: Any) -> bool:
        if correlation and correlation not in (event.correlation_id, event.id):
            return False
        if role:
            data = event.data
            r = getattr(data, "role", None) or getattr(getattr(data, "interaction", None), "role", None)
            return bool(r == role)
        return True

    async def main() -> None:
        async with open_bus(settings) as bus:
            subjects = [f"fw.{stream}.{t}" for t in type] if type else [f"fw.{stream}.>"]
            rows: list[tuple[int, Any]] = []
            last_seq = await bus.last_sequence(stream)
            for subject in subjects:
                sub = await bus.js.subscribe(subject, ordered_consumer=True, stream=bus.streams.for_stream(stream))
                try:
                    while True:
                        try:
                            msg = await sub.next_msg(timeout=0.5)
                        except Exception:
                            break
                        seq = msg.metadata.sequence.stream
                        try:
                            ev = parse_event(msg.data)
                        except InvalidEvent:
                            continue
                        if keep(ev):
                            rows.append((seq, ev))
                        if seq >= last_seq:
                            break
                finally:
                    await sub.unsubscribe()
            rows.sort(key=lambda r: r[0])
            rows = rows[-last:]
            _print_events(rows, as_json)
            if follow:
                subs = [await bus.js.subscribe(s, ordered_consumer=True, deliver_policy=_new()) for s in subjects]
                while True:
                    for sub in subs:
                        try:
                            msg = await sub.next_msg(timeout=0.2)
                        except Exception:
                            continue
                        try:
                            ev = parse_event(msg.data)
                        except InvalidEvent:
                            continue
                        if keep(ev):
                            _print_events([(msg.metadata.sequence.stream, ev)], as_json, header=False)

    try:
        _run(main)
    except KeyboardInterrupt:
        pass


def _new() -> Any:
    from nats.js.api import DeliverPolicy

    return DeliverPolicy.NEW


def _print_events(rows: list[tuple[int, Any]], as_json: bool, header: bool = True) -> None:
    if as_json:
        for _, ev in rows:
            sys.stdout.write(ev.to_bytes().decode() + "\n")
        sys.stdout.flush()
        return
    table = Table("seq", "time", "type", "role", "source", "correlation", "data", show_header=header)
    for seq, ev in rows:
        table.add_row(*_event_row(seq, ev))
    console.print(table)


# --------------------------------------------------------------------------- status


async def collect_status(bus: Bus, settings: Settings) -> dict[str, Any]:
    """Streams, consumer lag, projection positions and the rejected count, as a dict."""
    out: dict[str, Any] = {"streams": [], "consumers": [], "projections": [], "rejected": 0}
    for stream in (bus.streams.raw, bus.streams.log):
        info = await bus.js.stream_info(stream)
        out["streams"].append({
            "name": stream, "messages": info.state.messages, "bytes": info.state.bytes,
            "first_seq": info.state.first_seq, "last_seq": info.state.last_seq,
            "max_age_days": (info.config.max_age or 0) / 86400,
        })
        for c in await bus.js.consumers_info(stream):
            if not c.config.durable_name:
                continue
            out["consumers"].append({
                "name": c.name, "stream": stream, "lag": c.num_pending,
                "ack_pending": c.num_ack_pending, "redelivered": c.num_redelivered,
            })
    rejected = await bus.js.stream_info(bus.streams.log, subjects_filter="fw.log.event.rejected")
    out["rejected"] = sum((rejected.state.subjects or {}).values())
    host = PluginHost(settings)
    for projection in host.projections():
        path = projection_path(settings, projection)
        if not path.exists():
            out["projections"].append({"name": projection.name, "seq": 0, "applied": 0, "skipped": 0})
            continue
        import sqlite3

        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            seq, applied, skipped = db.execute("SELECT seq, applied, skipped FROM _position").fetchone()
        finally:
            db.close()
        out["projections"].append({"name": projection.name, "seq": seq, "applied": applied, "skipped": skipped})
    return out


@app.command()
def status(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Streams, consumer lag, projection positions, rejected events."""
    settings = _settings()

    async def main() -> dict[str, Any]:
        async with open_bus(settings) as bus:
            return await collect_status(bus, settings)

    st = _run(main)
    if as_json:
        sys.stdout.write(orjson.dumps(st).decode() + "\n")
        return
    t = Table("stream", "messages", "bytes", "first", "last", "max age (days)", title="streams")
    for s in st["streams"]:
        age = f"{s['max_age_days']:g}" if s["max_age_days"] else "forever"
        t.add_row(s["name"], str(s["messages"]), str(s["bytes"]), str(s["first_seq"]), str(s["last_seq"]), age)
    console.print(t)
    t = Table("consumer", "stream", "lag", "ack pending", "redelivered", title="processors")
    for c in st["consumers"]:
        t.add_row(c["name"], c["stream"], str(c["lag"]), str(c["ack_pending"]), str(c["redelivered"]))
    console.print(t)
    t = Table("projection", "position", "applied", "skipped", title="projections")
    for p in st["projections"]:
        t.add_row(p["name"], str(p["seq"]), str(p["applied"]), str(p["skipped"]))
    console.print(t)
    console.print(f"rejected events: [bold]{st['rejected']}[/bold]")


# --------------------------------------------------------------------------- stats


def stop_event(duration: float | None) -> asyncio.Event:
    """An event set by Ctrl-C or SIGTERM, or after ``duration`` seconds (call inside the running loop)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if duration:
        loop.call_later(duration, stop.set)
    return stop


def catch_up_projections(settings: Settings, names: Iterable[str] | None = None) -> None:
    """Bring the projections (all, or those ``names``) up to the end of the log before reading them;
    with no bus, say so and leave them as they were."""
    wanted = set(names) if names is not None else None

    async def main() -> None:
        async with open_bus(settings) as bus:
            for projection in PluginHost(settings).projections():
                if wanted is not None and projection.name not in wanted:
                    continue
                runner = ProjectionRunner(bus, projection, projection_path(settings, projection))
                try:
                    await runner.catch_up()
                finally:
                    runner.close()

    try:
        asyncio.run(main())
    except (BusUnavailable, EmbeddedServerError) as exc:
        err.print(f"[yellow]warning:[/yellow] showing the projections as they were: {exc}")


@app.command()
def stats(
    window_hours: Annotated[float, typer.Option(help="the recent window, in hours")] = 24.0,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Reward, cost and duration per role, model and prompt variant; scrubbed items; rejections."""
    from datetime import timedelta

    from plugins.stats import stats_data, stats_tables

    settings = _settings()
    window = timedelta(hours=window_hours)
    catch_up_projections(settings)
    if as_json:
        sys.stdout.write(orjson.dumps(stats_data(settings, window=window), default=str).decode() + "\n")
        return
    for table in stats_tables(settings, window=window):
        console.print(table)


# --------------------------------------------------------------------------- replay


@app.command()
def replay(
    projection: Annotated[str | None, typer.Option(help="the projection to rebuild")] = None,
    dataset: Annotated[str | None, typer.Option(help="rebuild this role's dataset (needs --until)")] = None,
    until: Annotated[int | None, typer.Option(help="stop at this log sequence")] = None,
    until_time: Annotated[datetime | None, typer.Option(help="stop at this time (ISO 8601)")] = None,
    compare: Annotated[bool, typer.Option(help="compare with the live projection")] = False,
) -> None:
    """Rebuild a projection, or a role's dataset, from the log alone."""
    settings = _settings()
    if (projection is None) == (dataset is None):
        err.print("[red]error:[/red] give exactly one of --projection NAME or --dataset ROLE")
        raise typer.Exit(2)
    if dataset is not None:
        if until is None:
            err.print("[red]error:[/red] --dataset needs --until SEQ (the log position of the dataset to rebuild)")
            raise typer.Exit(2)
        _replay_dataset(settings, dataset, until)
        return
    assert projection is not None
    host = PluginHost(settings)
    found = {p.name: p for p in host.projections()}
    if projection not in found:
        err.print(f"[red]error:[/red] no projection {projection!r}; known: {', '.join(sorted(found))}")
        raise typer.Exit(2)
    proj = found[projection]
    when = until_time.astimezone() if until_time else None
    target = settings.state_dir / "replays" / f"{projection}-{until or 'end'}.sqlite"

    async def main() -> int:
        async with open_bus(settings) as bus:
            return await rebuild(bus, proj, target, until_seq=until, until_time=when)

    pos = _run(main)
    console.print(f"rebuilt {projection} up to sequence {pos} into {target}")
    if compare:
        live = projection_path(settings, proj)
        diff = differences(live, target) if live.exists() else ["no live projection to compare with"]
        if diff:
            for d in diff:
                console.print(f"[yellow]differs[/yellow] {d}")
            raise typer.Exit(1)
        console.print("[green]identical[/green] to the live projection")


def _replay_dataset(settings: Settings, role: str, until: int) -> None:
    from plugins.dataset_builder import DatasetNotBuilt, rebuild_dataset

    async def main() -> tuple[str, Path]:
        async with open_bus(settings) as bus:
            return await rebuild_dataset(settings, bus, role, until)

    try:
        digest, path = _run(main)
    except DatasetNotBuilt as exc:
        err.print(f"[red]no dataset:[/red] {exc}")
        raise typer.Exit(1) from None
    console.print(f"rebuilt the {role} dataset as of log sequence {until}: {digest} in {path}")


# --------------------------------------------------------------------------- training and datasets


datasets_app = typer.Typer(help="Curated datasets: list, show, export.", invoke_without_command=True)
app.add_typer(datasets_app, name="datasets")


@datasets_app.callback()
def datasets_list(ctx: typer.Context) -> None:
    """List the datasets with their sizes and lineage."""
    if ctx.invoked_subcommand is None:
        from plugins.dataset_store import list_datasets

        console.print(list_datasets(_settings()))


@datasets_app.command("show")
def datasets_show(hash: Annotated[str, typer.Argument(help="the dataset hash (a unique prefix will do)")]) -> None:
    """The balance table and sample rows of one dataset."""
    from plugins.dataset_store import DatasetNotFound, show_dataset

    try:
        for renderable in show_dataset(_settings(), hash):
            console.print(renderable)
    except DatasetNotFound as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


@datasets_app.command("export")
def datasets_export(
    hash: Annotated[str, typer.Argument(help="the dataset hash (a unique prefix will do)")],
    format: Annotated[str, typer.Option(help="jsonl, parquet or hf")] = "jsonl",
    out: Annotated[Path, typer.Option(help="the folder to write")] = Path("dataset-export"),
) -> None:
    """Copy a dataset out as JSON lines, Parquet, or a Hugging Face dataset folder."""
    from plugins.dataset_store import DatasetNotFound, export_dataset

    try:
        path = export_dataset(_settings(), hash, format, out)
    except (DatasetNotFound, ValueError, FileExistsError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    console.print(f"exported to {path}")


# --------------------------------------------------------------------------- config


@config_app.command("show")
def config_show(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """The effective configuration (defaults < flywheel.toml < FLYWHEEL_* variables); secrets masked."""
    settings = _settings()
    data = settings.model_dump(mode="json")
    for section in data.values():
        if isinstance(section, dict):
            for key in list(section):
                if any(word in key for word in ("password", "token", "key")) and section[key]:
                    section[key] = "***"
    text = orjson.dumps(data, option=orjson.OPT_INDENT_2).decode()
    if as_json:
        sys.stdout.write(text + "\n")
    else:
        console.print_json(text)


# --------------------------------------------------------------------------- demo


@app.command()
def demo(
    bandits: Annotated[bool, typer.Option("--bandits", help="the bandit demo: no model, simulated rates")] = False,
    interactions: Annotated[int, typer.Option(help="--bandits: how many simulated agent turns")] = 200,
    state_dir: Annotated[Path | None, typer.Option(help="the run's state folder (default: a new one under"
                                                        " <state_dir>/demo-runs)")] = None,
    train_tasks: Annotated[int | None, typer.Option(min=1, help="work only the first N training tasks")] = None,
    held_out_tasks: Annotated[int | None, typer.Option(min=1, help="measure only the first N held-out tasks")] = None,
) -> None:
    """The whole loop on the embedded defaults: a simulated coding agent on the real base model,
    tested and corrected, then dataset, training, gate and deployment, and before/after figures."""
    from engine.demo import DemoError, run_bandit_demo, run_demo

    settings = _settings()
    if bandits:
        _run(lambda: run_bandit_demo(settings, interactions, console))
        return
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    try:
        _run(lambda: run_demo(settings, console, state_dir=state_dir, train_limit=train_tasks,
                              held_out_limit=held_out_tasks))
    except DemoError as exc:
        err.print(f"[red]demo stopped:[/red] {exc}")
        raise typer.Exit(1) from None


# --------------------------------------------------------------------------- commands beside their domain

#: modules under ``engine/commands`` that add commands; each has ``register(app, settings_loader, run)``
COMMAND_MODULES: tuple[str, ...] = (
    "engine.commands.dashboard",
    "engine.commands.forget",
    "engine.commands.deployments",
    "engine.commands.gateway",
    "engine.commands.training",
)


def _register_command_modules() -> None:
    import importlib

    for name in COMMAND_MODULES:
        importlib.import_module(name).register(app, _settings, _run)


_register_command_modules()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
