"""Long-running services a plugin registers (``register_services``) and ``flywheel up`` runs
beside its processors and projections: the dashboard, the gateway."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from flywheel_loop.engine.bus import Bus
    from flywheel_loop.engine.config import Settings
    from flywheel_loop.engine.plugin_host import PluginHost

__all__ = ["RunningService", "Service", "ServiceContext"]


class RunningService(Protocol):
    """A started service: where it answers (printed by ``flywheel up``), and how to stop it."""

    @property
    def url(self) -> str | None:
        """Where it answers, or None."""

    async def stop(self) -> None:
        """Stop serving; called once when the engine stops."""


@dataclass(frozen=True)
class ServiceContext:
    """What a service gets: the settings, the engine's bus, the plugin host and a logger, and
    ``warn`` for a line a person should see (a port in use, a missing key)."""

    settings: Settings
    bus: Bus
    plugins: PluginHost
    log: logging.Logger
    warn: Callable[[str], None]


@dataclass(frozen=True)
class Service:
    """A named service; ``start(ctx)`` returns it running, or None when it is switched off."""

    name: str
    start: Callable[[ServiceContext], Awaitable[RunningService | None]]
    description: str = ""
