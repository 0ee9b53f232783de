"""Finding the bus: the configured URL, the engine's embedded server, or a new one."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import orjson

from flywheel_loop.engine.bus import Bus
from flywheel_loop.engine.config import Settings
from flywheel_loop.engine.embedded import EmbeddedServer
from flywheel_loop.sdk.client import embedded_url


def _marker(settings: Settings) -> Path:
    return settings.layout.nats / "embedded.json"


def running_embedded_url(settings: Settings) -> str | None:
    """The URL of an embedded server a running ``flywheel up`` started, if it is alive."""
    return embedded_url(settings.state_dir)


def start_embedded(settings: Settings) -> EmbeddedServer:
    """Start the embedded server on the state folder and leave a marker for other commands."""
    cfg = settings.nats
    server = EmbeddedServer(
        settings.layout.nats, encryption_key=cfg.encryption_key(), cipher=cfg.embedded_cipher
    ).start()
    assert server.process is not None
    _marker(settings).write_bytes(orjson.dumps({"url": server.url, "pid": server.process.pid}))
    return server


@asynccontextmanager
async def open_bus(settings: Settings, ensure_streams: bool = True) -> AsyncIterator[Bus]:
    """A connected bus for the length of a command.

    Uses ``nats.url`` when set; otherwise the embedded server of a running engine; otherwise
    starts the embedded server on the state folder and stops it afterwards.
    """
    server: EmbeddedServer | None = None
    url = settings.nats.url or running_embedded_url(settings)
    if url is None:
        server = start_embedded(settings)
        url = server.url
    bus = await Bus.connect(settings, url)
    try:
        if ensure_streams:
            await bus.ensure_streams()
        yield bus
    finally:
        await bus.close()
        if server is not None:
            server.stop()
            _marker(settings).unlink(missing_ok=True)
