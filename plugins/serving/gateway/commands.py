"""``flywheel gateway``: serve the OpenAI- and Anthropic-compatible gateway alone (``flywheel up`` serves it too).

``flywheel gateway hash-key KEY`` prints the SHA-256 to put in ``[[gateway.keys]]`` (keys are never configured in
clear).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.text import Text

from flywheel_loop.engine.commands import console, fail, run, say, settings, stop_event, warn
from flywheel_loop.plugins.serving.gateway.settings import GatewayConfig


def register(app: typer.Typer) -> None:
    """Add ``flywheel gateway`` (and ``gateway hash-key``) to ``app``."""
    gateway_app = typer.Typer(help="The OpenAI- and Anthropic-compatible gateway agents call.",
                              invoke_without_command=True)
    app.add_typer(gateway_app, name="gateway")

    @gateway_app.callback()
    def gateway(
        ctx: typer.Context,
        port: Annotated[int | None, typer.Option(help="listen on this port (0 = any free one)")] = None,
        host: Annotated[str | None, typer.Option(help="listen on this interface (loopback only without keys)")] = None,
        duration: Annotated[float | None, typer.Option(help="stop after this many seconds")] = None,
    ) -> None:
        """Serve the gateway alone, until Ctrl-C."""
        if ctx.invoked_subcommand is not None:
            return
        from flywheel_loop.plugins.serving.gateway.service import GatewayUnavailable, run_gateway

        loaded = settings()
        overrides = {k: v for k, v in (("port", port), ("host", host)) if v is not None}
        if overrides:
            try:
                section = GatewayConfig.model_validate({**GatewayConfig.of(loaded).model_dump(), **overrides})
            except ValidationError as exc:
                problem = exc.errors(include_url=False)[0]
                fail(f"--{problem['loc'][0]} {problem['input']!r}: {problem['msg']}")
            loaded = loaded.model_copy(update={"gateway": section})

        async def main() -> None:
            stop = stop_event(duration)
            try:
                await run_gateway(loaded, stop, on_ready=lambda url: console.print(
                    Text("flywheel gateway", style="bold"),
                    Text(f"at {url} — point an agent's base URL here. Ctrl-C stops.")), warn=warn)
            except GatewayUnavailable as exc:
                fail(str(exc))

        _run_fast(main)

    @gateway_app.command("hash-key")
    def hash_key(key: Annotated[str, typer.Argument(help="the API key an agent will send")]) -> None:
        """Print the SHA-256 of a key, for ``[[gateway.keys]] sha256 = ...``."""
        from flywheel_loop.plugins.serving.gateway.access import hash_key as digest

        say(digest(key))


def _run_fast(main: Callable[[], Any]) -> None:
    """Run on uvloop when it is installed: the gateway's event loop is most of its cost per call."""
    try:
        import uvloop
    except ImportError:
        run(main)
        return
    import asyncio

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    try:
        run(main)
    finally:
        asyncio.set_event_loop_policy(None)
