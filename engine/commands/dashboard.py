"""``flywheel dashboard``: serve the web dashboard alone, on the projections under the state folder.

``flywheel up`` serves the same dashboard beside the engine. This command is for looking at a
state folder without running the engine here: it reads ``<state_dir>/projections/dashboard.sqlite``
read-only and follows it live while a ``flywheel up`` elsewhere on the same folder keeps folding
the log. With ``dashboard.read_only = false`` it also connects to the bus, so the request-training
buttons can publish.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console

from engine.config import DashboardConfig, Settings
from engine.dashboard.queries import projection_file

console = Console()
err = Console(stderr=True)


def register(app: typer.Typer, settings: Callable[[], Settings], run: Callable[..., Any]) -> None:
    @app.command()
    def dashboard(
        port: Annotated[int | None, typer.Option(help="listen on this port (0 = any free one)")] = None,
        host: Annotated[str | None, typer.Option(help="listen on this interface")] = None,
        duration: Annotated[float | None, typer.Option(help="stop after this many seconds")] = None,
    ) -> None:
        """Serve the web dashboard on the projections under the state folder (read-only by default)."""
        from engine.dashboard.server import DashboardServer, DashboardUnavailable

        loaded = settings()
        overrides = {k: v for k, v in (("port", port), ("host", host)) if v is not None}
        if overrides:
            try:
                section = DashboardConfig.model_validate({**loaded.dashboard.model_dump(), **overrides})
            except ValidationError as exc:
                problem = exc.errors(include_url=False)[0]
                err.print(f"[red]error:[/red] --{problem['loc'][0]} {problem['input']!r}: {problem['msg']}")
                raise typer.Exit(2) from None
            loaded = loaded.model_copy(update={"dashboard": section})
        if not projection_file(loaded.state_dir).exists():
            err.print(
                f"[yellow]note:[/yellow] no dashboard projection under {loaded.state_dir} yet: the pages stay empty"
                " until `flywheel up` folds the log there"
            )

        async def main() -> None:
            async with AsyncExitStack() as stack:
                request_training = None
                if not loaded.dashboard.read_only:
                    request_training = await _training_requester(loaded, stack)
                server = DashboardServer(loaded, request_training)
                try:
                    url = await server.start()
                except DashboardUnavailable as exc:
                    err.print(f"[red]error:[/red] {exc}")
                    raise typer.Exit(2) from None
                stack.push_async_callback(server.stop)
                mode = "read-only" if loaded.dashboard.read_only else "with actions"
                console.print(f"[bold]flywheel dashboard[/bold] ({mode}) at {url} — Ctrl-C stops.")
                from engine.cli import stop_event

                await stop_event(duration).wait()

        run(main)


async def _training_requester(settings: Settings, stack: AsyncExitStack) -> Callable[[str], Awaitable[str]]:
    from engine.connection import open_bus
    from plugins.training_trigger import request_training

    bus = await stack.enter_async_context(open_bus(settings))

    async def requester(role: str) -> str:
        return str((await request_training(bus, role, detail="requested from the dashboard")).id)

    return requester


