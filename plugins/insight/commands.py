"""``flywheel dashboard``, ``flywheel stats`` and ``flywheel runs``: what the flywheel shows a person.

``flywheel dashboard`` serves the web dashboard alone, on the projections under the state folder.

``flywheel up`` serves the same dashboard beside the engine. This command is for looking at a
state folder without running the engine here: it reads ``<state_dir>/projections/dashboard.sqlite``
read-only and follows it live while a ``flywheel up`` elsewhere on the same folder keeps folding
the log. With ``dashboard.read_only = false`` it also connects to the bus, so the request-training
buttons can publish.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from datetime import timedelta
from typing import Annotated, Any

import orjson
import typer
from pydantic import ValidationError
from rich.table import Table
from rich.text import Text

from flywheel_loop.engine.commands import (
    catch_up_projections,
    console,
    err,
    fail,
    open_bus,
    plugin_host,
    run,
    settings,
    stop_event,
)
from flywheel_loop.engine.config import Settings
from flywheel_loop.plugins.insight.dashboard.queries import projection_file
from flywheel_loop.plugins.insight.settings import DashboardConfig


def register(app: typer.Typer) -> None:
    """Add ``flywheel dashboard``, ``stats`` and ``runs`` to ``app``."""

    @app.command()
    def dashboard(
        port: Annotated[int | None, typer.Option(help="listen on this port (0 = any free one)")] = None,
        host: Annotated[str | None, typer.Option(help="listen on this interface")] = None,
        duration: Annotated[float | None, typer.Option(help="stop after this many seconds")] = None,
    ) -> None:
        """Serve the web dashboard on the projections under the state folder (read-only by default)."""
        from flywheel_loop.plugins.insight.dashboard.server import DashboardServer, DashboardUnavailable

        loaded = settings()
        overrides = {k: v for k, v in (("port", port), ("host", host)) if v is not None}
        if overrides:
            try:
                section = DashboardConfig.model_validate({**DashboardConfig.of(loaded).model_dump(), **overrides})
            except ValidationError as exc:
                problem = exc.errors(include_url=False)[0]
                fail(f"--{problem['loc'][0]} {problem['input']!r}: {problem['msg']}")
            loaded = loaded.model_copy(update={"dashboard": section})
        if not projection_file(loaded.state_dir).exists():
            err.print(Text("note: ", style="yellow"), Text(
                f"no dashboard projection under {loaded.state_dir} yet: the pages stay empty"
                " until `flywheel up` folds the log there"
            ), sep="")

        async def main() -> None:
            async with AsyncExitStack() as stack:
                request_training = None
                if not DashboardConfig.of(loaded).read_only:
                    request_training = await _training_requester(loaded, stack)
                server = DashboardServer(loaded, request_training, plugin_host(loaded).dashboard_pages())
                try:
                    url = await server.start()
                except DashboardUnavailable as exc:
                    fail(str(exc))
                stack.push_async_callback(server.stop)
                mode = "read-only" if DashboardConfig.of(loaded).read_only else "with actions"
                console.print(Text("flywheel dashboard", style="bold"), Text(f"({mode}) at {url} — Ctrl-C stops."))
                await stop_event(duration).wait()

        run(main)

    @app.command()
    def stats(
        window_hours: Annotated[float, typer.Option(help="the recent window, in hours")] = 24.0,
        as_json: Annotated[bool, typer.Option("--json")] = False,
    ) -> None:
        """Reward, cost and duration per role, model and prompt variant; scrubbed items; rejections."""
        from flywheel_loop.plugins.insight.stats import stats_data, stats_tables

        cfg = settings()
        window = timedelta(hours=window_hours)
        catch_up_projections(cfg)
        if as_json:
            sys.stdout.write(orjson.dumps(stats_data(cfg, window=window), default=str).decode() + "\n")
            return
        for table in stats_tables(cfg, window=window):
            console.print(table)

    @app.command()
    def runs(
        role: Annotated[str | None, typer.Option(help="only this role")] = None,
        as_json: Annotated[bool, typer.Option("--json")] = False,
    ) -> None:
        """Training runs and evaluations with their figures and the gate's verdicts."""
        from flywheel_loop.plugins.insight.dashboard.queries import PROJECTION_NAME, DashboardData

        cfg = settings()
        catch_up_projections(cfg, [PROJECTION_NAME])
        data = DashboardData(projection_file(cfg.state_dir))
        runs_ = [r for r in data.page("training").get("runs", []) if role in (None, r.get("role"))]
        evals = [e for e in data.page("evaluations").get("evaluations", []) if role in (None, e.get("role"))]
        if as_json:
            console.print_json(orjson.dumps({"runs": runs_, "evaluations": evals}, default=str).decode())
            return
        t = Table("run", "role", "status", "steps", "train loss", "val loss", "tokens/s", "adapter", title="runs")
        for r in runs_:
            t.add_row(r["run_id"], r.get("role") or "", r["status"], f"{r['step']}/{r['total_steps']}",
                      _fmt(r.get("train_loss")), _fmt(r.get("val_loss")), _fmt(r.get("tokens_per_s"), 0),
                      (r.get("adapter_hash") or r.get("reason") or "")[:24])
        console.print(t)
        t = Table("run", "role", "verdict", "checks (figure, interval, items)", "figures (candidate / in service)",
                  "reasons", title="evaluations")
        for e in evals:
            figures = "\n".join(f"{m['name']}: {_fmt(m['candidate'])} / {_fmt(m['baseline'])}" for m in e["metrics"])
            verdict = e.get("verdict") or ("passed" if e["passed"] else "failed")
            checks = "\n".join(check_line(c) for c in e.get("checks") or [])
            t.add_row(e["run_id"], e["role"], Text(verdict, VERDICT_STYLES.get(verdict, "")), checks or "-",
                      figures, "\n".join(e["reasons"]))
        console.print(t)
        _print_rounds(cfg, role)




VERDICT_STYLES = {"passed": "green", "ok": "green", "failed": "red", "inconclusive": "yellow"}


def check_line(check: dict[str, Any]) -> str:
    """One gate check as a line: status, name, figure [interval] and n (a pass-rate difference in points)."""
    points = check.get("name") == "task pass rate"
    scale, digits, unit = (100.0, 1, " pts") if points else (1.0, 2, "")

    def num(v: Any) -> str:
        return f"{scale * v:+.{digits}f}" if points else f"{scale * v:.{digits}f}"

    text = f"{check.get('status')}: {check.get('name')}"
    if check.get("value") is not None:
        text += f" {num(check['value'])}{unit}"
    if check.get("low") is not None and check.get("high") is not None:
        text += f" [{num(check['low'])}, {num(check['high'])}]"
    if check.get("items") is not None:
        text += f" n={check['items']}"
    if check.get("p_value") is not None:
        text += f" p={check['p_value']:.2g}"
    return text


def _print_rounds(cfg: Settings, role: str | None) -> None:
    """The rounds of learning from verified attempts, when there are any (read from the log)."""
    from flywheel_loop.plugins.shared.rounds import ROUND_EVENTS, fold_rounds, rounds_table

    async def read() -> list[Any]:
        async with open_bus(cfg, ensure_streams=False) as bus:
            return fold_rounds(await bus.read_log(ROUND_EVENTS), role)

    found = run(read)
    if found:
        console.print(rounds_table(found))


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)




async def _training_requester(settings: Settings, stack: AsyncExitStack) -> Callable[[str], Awaitable[str]]:
    from flywheel_loop.plugins.shared.training_requests import request_training

    bus = await stack.enter_async_context(open_bus(settings))

    async def requester(role: str) -> str:
        return str((await request_training(bus, role, detail="requested from the dashboard")).id)

    return requester


