"""Run the dashboard with uvicorn inside an asyncio loop the caller owns (``flywheel up``'s).

The socket is bound before uvicorn starts, so a port in use is a clear ``DashboardUnavailable``
(uvicorn itself would exit the process) and port 0 gives a free port whose URL is known at once.
Signals stay with the host: uvicorn's own handlers are not installed, and ``stop`` ends the live
streams first so shutting down does not wait on open browser tabs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

from flywheel_loop.engine.bus import Bus
from flywheel_loop.engine.config import Settings
from flywheel_loop.engine.extensions import DashboardPage
from flywheel_loop.engine.services import ServiceContext
from flywheel_loop.plugins.insight.dashboard.app import TrainingRequester, create_app
from flywheel_loop.plugins.insight.dashboard.queries import DashboardData, projection_file
from flywheel_loop.plugins.insight.settings import DashboardConfig
from flywheel_loop.plugins.shared.http_server import CannotListen, HostedServer

log = logging.getLogger(__name__)


#: the dashboard cannot listen where the configuration says
DashboardUnavailable = CannotListen


class DashboardServer:
    """The dashboard over ``<state_dir>/projections/dashboard.sqlite``, served until ``stop``."""

    def __init__(self, settings: Settings, request_training: TrainingRequester | None = None,
                 pages: Sequence[DashboardPage] = ()) -> None:
        self.config: DashboardConfig = DashboardConfig.of(settings)
        self.stopping = asyncio.Event()
        self.app = create_app(
            DashboardData(projection_file(settings.state_dir)),
            refresh_s=self.config.refresh_s,
            read_only=self.config.read_only,
            request_training=request_training,
            stopping=self.stopping,
            plugin_pages=pages,
            settings=settings,
        )
        self.server = HostedServer(self.app, self.config.host, self.config.port, "dashboard",
                                   timeout_graceful_shutdown=3)

    @property
    def url(self) -> str:
        return self.server.base_url + "/"

    async def start(self) -> str:
        """Bind, start serving in the background, and return the URL once it answers."""
        await self.server.start()
        return self.url

    async def stop(self) -> None:
        """End the live streams, stop accepting connections, and wait for uvicorn to finish."""
        self.stopping.set()
        await self.server.stop(10)

    async def __aenter__(self) -> DashboardServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()


async def start_dashboard(
    settings: Settings, bus: Bus | None = None, warn: Callable[[str], object] = log.warning,
    pages: Sequence[DashboardPage] = (),
) -> DashboardServer | None:
    """For ``flywheel up``: the running dashboard, or None when ``dashboard.enabled`` is false or it
    cannot listen (``warn`` says why: the engine runs on without it). Not read-only and given the
    bus, its request-training buttons publish there."""
    if not DashboardConfig.of(settings).enabled:
        return None
    request_training: TrainingRequester | None = None
    if bus is not None and not DashboardConfig.of(settings).read_only:
        from flywheel_loop.plugins.shared.training_requests import request_training as publish_request

        async def request_training(role: str) -> str:
            return str((await publish_request(bus, role, detail="requested from the dashboard")).id)

    server = DashboardServer(settings, request_training, pages)
    try:
        await server.start()
    except DashboardUnavailable as exc:
        warn(f"no dashboard: {exc}")
        return None
    return server


async def dashboard_service(ctx: ServiceContext) -> DashboardServer | None:
    """The dashboard as a service of ``flywheel up`` (``register_services``)."""
    return await start_dashboard(ctx.settings, ctx.bus, warn=ctx.warn, pages=ctx.plugins.dashboard_pages())
