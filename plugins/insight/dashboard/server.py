"""Run the dashboard with uvicorn inside an asyncio loop the caller owns (``flywheel up``'s).

The socket is bound before uvicorn starts, so a port in use is a clear ``DashboardUnavailable``
(uvicorn itself would exit the process) and port 0 gives a free port whose URL is known at once.
Signals stay with the host: uvicorn's own handlers are not installed, and ``stop`` ends the live
streams first so shutting down does not wait on open browser tabs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import uvicorn

from flywheel_loop.engine.bus import Bus
from flywheel_loop.engine.config import Settings
from flywheel_loop.engine.extensions import DashboardPage
from flywheel_loop.engine.services import ServiceContext
from flywheel_loop.plugins.insight.dashboard.app import TrainingRequester, create_app
from flywheel_loop.plugins.insight.dashboard.queries import DashboardData, projection_file
from flywheel_loop.plugins.insight.settings import DashboardConfig

log = logging.getLogger(__name__)


class DashboardUnavailable(RuntimeError):
    """The dashboard cannot listen where the configuration says."""


class _HostedServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to the process hosting it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


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
        self._socket: socket.socket | None = None
        self._server: _HostedServer | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        if self._socket is None:
            raise RuntimeError("the dashboard is not started")
        host, port = self._socket.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}/"

    def _bind(self) -> socket.socket:
        host, port = self.config.host, self.config.port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise DashboardUnavailable(
                f"dashboard cannot listen on {host}:{port} ({exc.strerror or exc}); set dashboard.port to a free"
                " port (0 picks one) or dashboard.enabled = false"
            ) from None
        sock.listen(128)
        sock.setblocking(False)
        return sock

    async def start(self) -> str:
        """Bind, start serving in the background, and return the URL once it answers."""
        self._socket = self._bind()
        config = uvicorn.Config(
            self.app, log_level="warning", lifespan="off", timeout_graceful_shutdown=3,
            access_log=False,
        )
        self._server = _HostedServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[self._socket]), name="dashboard")
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise DashboardUnavailable("the dashboard stopped while starting")
            await asyncio.sleep(0.02)
        return self.url

    async def stop(self) -> None:
        """End the live streams, stop accepting connections, and wait for uvicorn to finish."""
        self.stopping.set()
        if self._server is not None:
            self._server.should_exit = True
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, 10)
            except (TimeoutError, asyncio.CancelledError):
                log.warning("the dashboard did not stop within 10 s")
            self._task = None

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
