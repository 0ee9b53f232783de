"""What a ``flywheel`` command needs, for the engine's own commands and the plugins' alike
(``register_commands``): the settings with every plugin section validated, a plugin host, a
way to run a coroutine that turns what a user can fix into one clear line, consoles, a stop
event for Ctrl-C, and projections caught up before they are read.

User-facing text is printed with ``say`` / ``fail`` (no rich markup interpretation), so a
message that contains brackets — a regular expression, a list — is shown as it is.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Iterable
from typing import NoReturn, TypeVar

import typer
from rich.console import Console
from rich.text import Text

from flywheel_loop.engine.bus import BusUnavailable, PublishFailed
from flywheel_loop.engine.config import ConfigError, Settings, load_settings
from flywheel_loop.engine.connection import open_bus
from flywheel_loop.engine.embedded import EmbeddedServerError
from flywheel_loop.engine.keys import KeyStoreError
from flywheel_loop.engine.plugin_host import PluginError, PluginHost
from flywheel_loop.engine.projection import ProjectionRunner

__all__ = [
    "catch_up_projections",
    "console",
    "err",
    "fail",
    "open_bus",
    "plugin_host",
    "run",
    "say",
    "settings",
    "stop_event",
    "warn",
]

T = TypeVar("T")

# no markup in what is printed: user text (a regular expression, a placeholder such as [EMAIL]) is shown
# as it is; styles come from rich's Text objects
console = Console(markup=False)
err = Console(stderr=True, markup=False)

#: errors a user can fix, shown as one line instead of a traceback
USER_ERRORS = (BusUnavailable, PublishFailed, EmbeddedServerError, ConfigError, PluginError, KeyStoreError)


def say(text: str, style: str | None = None) -> None:
    """Print ``text`` as it is (no markup), optionally styled."""
    console.print(Text(text, style=style or ""))


def warn(text: str) -> None:
    err.print(Text("warning: ", style="yellow"), Text(text), sep="")


def fail(text: str, code: int = 2, label: str = "error") -> NoReturn:
    """Print ``label: text`` on stderr (no markup) and exit with ``code``."""
    err.print(Text(f"{label}: ", style="red"), Text(text), sep="")
    raise typer.Exit(code)


def plugin_host(cfg: Settings) -> PluginHost:
    """The plugin host over ``cfg``; a plugin that fails to load exits with the reason."""
    try:
        return PluginHost(cfg)
    except (ConfigError, PluginError) as exc:
        fail(str(exc))


def settings() -> Settings:
    """The configuration, every plugin section validated; a bad value exits with the reason."""
    try:
        loaded = load_settings()
        PluginHost(loaded)  # validates the plugins' sections against what they registered
    except (ConfigError, PluginError) as exc:
        fail(str(exc))
    return loaded


def run(coro: Callable[[], Awaitable[T]]) -> T:
    """Run a command's coroutine; turn the errors a user can fix into one clear line."""
    async def main() -> T:
        return await coro()

    try:
        return asyncio.run(main())
    except USER_ERRORS as exc:
        fail(str(exc))


def stop_event(duration: float | None) -> asyncio.Event:
    """An event set by Ctrl-C or SIGTERM, or after ``duration`` seconds (call inside the running loop)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if duration:
        loop.call_later(duration, stop.set)
    return stop


def catch_up_projections(cfg: Settings, names: Iterable[str] | None = None) -> None:
    """Bring the projections (all, or those ``names``) up to the end of the log before reading them;
    with no bus, say so and leave them as they were."""
    wanted = set(names) if names is not None else None

    async def main() -> None:
        async with open_bus(cfg) as bus:
            for projection in PluginHost(cfg).projections():
                if wanted is not None and projection.name not in wanted:
                    continue
                runner = ProjectionRunner(bus, projection, cfg.layout.projection(projection.name))
                try:
                    await runner.catch_up()
                finally:
                    runner.close()

    try:
        asyncio.run(main())
    except (BusUnavailable, EmbeddedServerError) as exc:
        warn(f"showing the projections as they were: {exc}")
