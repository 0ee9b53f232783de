"""The ``flywheel`` command line: the engine's own commands, and every plugin's (``register_commands``).

The engine's commands run the engine and look at the bus: ``up``, ``record``, ``events``,
``status``, ``replay``, ``config show``, ``plugins`` and ``artifacts`` (``artifact_commands.py``).
Everything else (``train``, ``stats``, ``deployments``, ``forget``, ``demo``, ...) is added by the
feature that owns it, like any third-party plugin's commands.
"""

from __future__ import annotations

import logging
import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.table import Table
from rich.text import Text

from flywheel_loop.engine import commands as cmd
from flywheel_loop.engine.app import Engine, projection_path
from flywheel_loop.engine.artifact_commands import artifacts_app
from flywheel_loop.engine.bus import Bus
from flywheel_loop.engine.config import ConfigError, Settings, load_settings
from flywheel_loop.engine.connection import open_bus, running_embedded_url, start_embedded
from flywheel_loop.engine.extensions import NothingToRebuild
from flywheel_loop.engine.plugin_host import PluginError, PluginHost, installed_plugins
from flywheel_loop.engine.replay import differences, rebuild
from flywheel_loop.schemas import InvalidEvent, new_id, parse_event
from flywheel_loop.sdk.recorder import events_from_jsonl

console = cmd.console
err = cmd.err


def build_app() -> typer.Typer:
    """The root command with the engine's commands and every enabled plugin's."""
    app = typer.Typer(help="Flywheel: a continuous-learning engine for coding agents.", no_args_is_help=True)
    config_app = typer.Typer(help="Inspect the configuration.", no_args_is_help=True)
    app.add_typer(config_app, name="config")
    app.add_typer(artifacts_app, name="artifacts")
    app.command()(up)
    app.command()(record)
    app.command()(events)
    app.command()(status)
    app.command()(replay)
    app.command("plugins")(plugins_list)
    config_app.command("show")(config_show)
    _command_host().add_commands(app)
    return app


def _command_host() -> PluginHost:
    """The plugins whose commands are listed: those the configuration enables; with a broken
    configuration, every installed plugin (the command that needs the settings says what is wrong)."""
    try:
        return PluginHost(load_settings())
    except (ConfigError, PluginError):
        # the defaults alone: Settings() would read the same bad variables or file again and raise
        host = PluginHost(Settings.model_construct(), load_entry_points=False)
        for name, ep in sorted(installed_plugins().items()):
            try:
                host.pm.register(ep.load(), name=name)
            except Exception:
                continue  # a broken plugin's commands are not listed; `flywheel plugins` says why
        return host


# --------------------------------------------------------------------------- up


def up(
    only: Annotated[list[str] | None, typer.Option(help="run only these processors/projections/services")] = None,
    duration: Annotated[float | None, typer.Option(help="stop after this many seconds")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run the engine: every enabled plugin's processors, projections and services; an embedded
    NATS when no URL is configured."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    settings = cmd.settings()

    async def main() -> None:
        from flywheel_loop.engine import telemetry

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
            stop = cmd.stop_event(duration)
            cmd.say(
                f"flywheel up on {url}{' (embedded)' if server else ''}: "
                f"{len(engine.workers)} processors ({', '.join(w.processor.name for w in engine.workers) or '-'}), "
                f"{len(engine.runners)} projections ({', '.join(r.projection.name for r in engine.runners) or '-'}), "
                f"{len(engine.services)} services ({', '.join(s.name for s in engine.services) or '-'}). Ctrl-C stops."
            )
            for name, service in await engine.start_services(warn=cmd.warn):
                if service.url:
                    cmd.say(f"{name}: {service.url}")
            try:
                await engine.run(stop)
            finally:
                await engine.stop_services()
            await bus.close()
            cmd.say("stopped: in-flight work drained")
        finally:
            if server is not None:
                server.stop()

    cmd.run(main)


# --------------------------------------------------------------------------- record


def record(
    file: Annotated[str, typer.Argument(help="a JSON event, a JSON array, or JSON lines; - for stdin")] = "-",
) -> None:
    """Validate events and publish them. Missing id, time and source are filled in."""
    settings = cmd.settings()
    data = sys.stdin.buffer.read() if file == "-" else Path(file).read_bytes()
    try:
        raws = events_from_jsonl(data)
    except orjson.JSONDecodeError as exc:
        cmd.fail(f"{file}: not JSON: {exc}")
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
            err.print(Text("invalid ", style="red"), Text(p), sep="")
        cmd.fail("nothing was published", code=1)

    async def main() -> None:
        async with open_bus(settings) as bus:
            await bus.publish_many(events)

    cmd.run(main)
    for e in events:
        console.print(f"recorded {e.type} {e.id}")


# --------------------------------------------------------------------------- events


def _event_row(seq: int, event: Any) -> list[str]:
    data = event.data
    role = getattr(data, "role", None) or getattr(getattr(data, "interaction", None), "role", None) or ""
    summary = ("(forgotten) " if event.forgotten else "") + orjson.dumps(data.model_dump(mode="json")).decode()
    return [str(seq), event.time.strftime("%Y-%m-%d %H:%M:%S"), event.type, role, event.source,
            event.correlation_id or "", summary[:80]]


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
    settings = cmd.settings()
    if stream not in ("log", "raw"):
        cmd.fail("--stream is log or raw")

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
                            ev = await bus.keys.open(msg.data)  # sealed text opened; a forgotten subject's stays blank
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
                            ev = await bus.keys.open(msg.data)
                        except InvalidEvent:
                            continue
                        if keep(ev):
                            _print_events([(msg.metadata.sequence.stream, ev)], as_json, header=False)

    try:
        cmd.run(main)
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


def status(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Streams, consumer lag, projection positions, rejected events."""
    settings = cmd.settings()

    async def main() -> dict[str, Any]:
        async with open_bus(settings) as bus:
            return await collect_status(bus, settings)

    st = cmd.run(main)
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
    console.print(Text("rejected events: "), Text(str(st["rejected"]), style="bold"), sep="")


# --------------------------------------------------------------------------- replay


def replay(
    projection: Annotated[str | None, typer.Option(help="the projection to rebuild")] = None,
    dataset: Annotated[str | None, typer.Option(help="rebuild this role's dataset (needs --until)")] = None,
    until: Annotated[int | None, typer.Option(help="stop at this log sequence")] = None,
    until_time: Annotated[datetime | None, typer.Option(help="stop at this time (ISO 8601)")] = None,
    compare: Annotated[bool, typer.Option(help="compare with the live projection")] = False,
) -> None:
    """Rebuild a projection, or a role's dataset, from the log alone."""
    settings = cmd.settings()
    if (projection is None) == (dataset is None):
        cmd.fail("give exactly one of --projection NAME or --dataset ROLE")
    if dataset is not None:
        if until is None:
            cmd.fail("--dataset needs --until SEQ (the log position of the dataset to rebuild)")
        _rebuild_artifact(settings, "dataset", dataset, until)
        return
    assert projection is not None
    host = cmd.plugin_host(settings)
    found = {p.name: p for p in host.projections()}
    if projection not in found:
        cmd.fail(f"no projection {projection!r}; known: {', '.join(sorted(found))}")
    proj = found[projection]
    when = until_time.astimezone() if until_time else None
    target = settings.layout.replay(f"{projection}-{until or 'end'}")

    async def main() -> int:
        async with open_bus(settings) as bus:
            return await rebuild(bus, proj, target, until_seq=until, until_time=when)

    pos = cmd.run(main)
    console.print(f"rebuilt {projection} up to sequence {pos} into {target}")
    if compare:
        live = projection_path(settings, proj)
        diff = differences(live, target) if live.exists() else ["no live projection to compare with"]
        if diff:
            for d in diff:
                console.print(Text("differs ", style="yellow"), Text(d), sep="")
            raise typer.Exit(1)
        console.print(Text("identical", style="green"), Text("to the live projection"))


def _rebuild_artifact(settings: Settings, kind: str, key: str, until: int) -> None:
    """Rebuild an artifact a plugin registered a rebuilder for (``register_rebuilders``)."""
    rebuilders = cmd.plugin_host(settings).rebuilders()
    if kind not in rebuilders:
        cmd.fail(f"no enabled plugin rebuilds {kind}s from the log (known: {', '.join(sorted(rebuilders)) or 'none'})")
    rebuilder = rebuilders[kind]

    async def main() -> tuple[str, Path]:
        async with open_bus(settings) as bus:
            return await rebuilder.rebuild(settings, bus, key, until)

    try:
        digest, path = cmd.run(main)
    except NothingToRebuild as exc:
        cmd.fail(str(exc), code=1, label=f"no {kind}")
    cmd.say(f"rebuilt the {key} {kind} as of log sequence {until}: {digest} in {path}")


# --------------------------------------------------------------------------- config


def config_show(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """The effective configuration (defaults < flywheel.toml < FLYWHEEL_* variables); secrets masked."""
    settings = cmd.settings()
    for _, model in cmd.plugin_host(settings).sections().values():
        settings.section(model)  # every section, with its defaults
    data = _masked(settings.model_dump(mode="json"))
    text = orjson.dumps(data, option=orjson.OPT_INDENT_2).decode()
    if as_json:
        sys.stdout.write(text + "\n")
    else:
        console.print_json(text)




def _masked(value: Any, key: str = "") -> Any:
    """Secrets (passwords, tokens, keys) replaced by ``***`` at any depth."""
    if isinstance(value, dict):
        return {k: _masked(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(v) for v in value]
    if value and any(word in key for word in ("password", "token", "key")) and not key.endswith("_file"):
        return "***"
    return value


# --------------------------------------------------------------------------- plugins


def plugins_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """The installed plugins: which are enabled, and what each registers (settings sections,
    processors, projections, services, assessors, runtimes)."""
    settings = cmd.settings()
    host = cmd.plugin_host(settings)
    enabled = set(host.names)
    owners: dict[str, dict[str, list[str]]] = {name: {} for name in sorted(installed_plugins())}
    owners.update(host.inventory())
    rows: list[dict[str, Any]] = [
        {"plugin": name, "enabled": name in enabled, **parts} for name, parts in sorted(owners.items())
    ]
    if as_json:
        sys.stdout.write(orjson.dumps(rows).decode() + "\n")
        return
    table = Table("plugin", "enabled", "registers", title="plugins")
    for name, parts in sorted(owners.items()):
        registers = "; ".join(f"{k}: {', '.join(v)}" for k, v in parts.items())
        table.add_row(Text(name), "yes" if name in enabled else "no", Text(registers))
    console.print(table)


def main() -> None:
    build_app()()


app = build_app()

if __name__ == "__main__":
    main()
