"""The gateway as a service: its parts wired together, served by uvicorn until told to stop.

``run_gateway(settings, stop)`` is what ``flywheel up`` and ``flywheel gateway`` run: it binds the socket first
(a taken port is a clear ``GatewayUnavailable``; port 0 picks a free one whose URL is known at once), starts the
recorder and the log follower (neither waits for the bus), and serves until ``stop`` is set; then it stops
accepting, lets streams in flight end (``timeout_graceful_shutdown``), and flushes or spills the records.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import Callable, Mapping
from typing import Any

from flywheel_loop.engine.config import Settings
from flywheel_loop.engine.services import ServiceContext
from flywheel_loop.plugins.serving.gateway.access import Access, bind_host
from flywheel_loop.plugins.serving.gateway.follow import LogFollower
from flywheel_loop.plugins.serving.gateway.recording import Recording
from flywheel_loop.plugins.serving.gateway.routing import Router, ServiceTable, Target
from flywheel_loop.plugins.serving.gateway.settings import GatewayConfig
from flywheel_loop.plugins.serving.gateway.upstream import Upstreams
from flywheel_loop.plugins.serving.settings import BanditSection
from flywheel_loop.plugins.shared.http_server import CannotListen, HostedServer
from flywheel_loop.schemas import new_id
from flywheel_loop.sdk.recorder import SpillingRecorder
from flywheel_loop.sdk.selector import NoEligibleArm, Selector

__all__ = ["Gateway", "GatewayServer", "GatewayUnavailable", "gateway_service", "run_gateway"]

log = logging.getLogger(__name__)


#: the gateway cannot listen where the configuration says
GatewayUnavailable = CannotListen


class Gateway:
    """Everything a request needs: access, routing, upstreams, recording, bandits, and the log follower."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cfg = GatewayConfig.of(settings)
        # Recording must not wait on the bus: a short publish budget, so an outage spills to disk soon.
        nats = settings.nats.model_copy(update={"publish_retry_s": min(settings.nats.publish_retry_s, 2.0),
                                                "publish_timeout_s": min(settings.nats.publish_timeout_s, 2.0)})
        recorder_settings = settings.model_copy(update={"nats": nats})
        self.recorder = SpillingRecorder(recorder_settings, source="gateway", capacity=self.cfg.record_capacity,
                                         spill_after_s=self.cfg.spill_after_s,
                                         spill_dir=settings.state_dir / "gateway" / "spill")
        self.recording = Recording(self.cfg, self.recorder)
        self.access = Access(self.cfg.keys)
        self.table = ServiceTable()
        self.router = Router(self.cfg, self.table)
        self.upstreams = Upstreams(self.cfg.max_connections, self.cfg.connect_timeout_s, self.cfg.request_timeout_s)
        bandit = BanditSection.of(settings)
        wants_selector = bool(bandit.prompt_variants) or any(r.route == "bandit" for r in self.cfg.roles.values())
        self.selector = (
            Selector(bandit, settings, source="gateway", recorder=self.recorder) if wants_selector else None
        )
        self.follower = LogFollower(settings, self.table, self.recording.owners,
                                    self.selector.fold if self.selector is not None else None)
        self._stop = asyncio.Event()
        self._follow_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.recorder.start()
        await self.upstreams.start()
        self._follow_task = asyncio.create_task(self.follower.run(self._stop), name="gateway-follower")

    async def close(self, flush_s: float = 5.0) -> None:
        self._stop.set()
        if self._follow_task is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._follow_task, 5.0)
        await self.upstreams.close()
        await self.recorder.close(flush_s)

    def session_of(self, headers: Mapping[str, str], body: dict[str, Any], api: str) -> str:
        """The session id of a request, from the configured sources in order; none found: a fresh one."""
        for source in self.cfg.session_sources:
            value: Any = None
            if source == "header":
                value = headers.get(self.cfg.session_header)
            elif source == "openai_user" and api.startswith("openai"):
                value = body.get("user")
            elif source == "anthropic_metadata" and api.startswith("anthropic"):
                metadata = body.get("metadata")
                value = metadata.get("user_id") if isinstance(metadata, dict) else None
            if isinstance(value, str) and value:
                return value
        return new_id()

    def route(self, model: str, session: str) -> tuple[Target, str | None]:
        """The target for a request, with the bandits' choices applied: (target, prompt variant). A name
        that is not served raises before any choice is made, so no ``arm.selected`` is recorded for it."""
        spec = self.cfg.roles.get(model)
        target: Target | None = None
        if self.selector is not None and spec is not None and spec.route == "bandit":
            try:
                chosen = self.selector.select_model(model)
            except NoEligibleArm:
                chosen = None
            if chosen is not None:
                picked = self.router.resolve(chosen, session)
                target = Target(picked.served_version, model, picked.base_url, picked.upstream_model, model,
                                picked.api_key, picked.canary)
        if target is None:
            target = self.router.resolve(model, session)
        variant = None
        if self.selector is not None and model in BanditSection.of(self.settings).prompt_variants:
            variant = self.selector.select_prompt(model)
        return target, variant


class GatewayServer:
    """The gateway's HTTP server around a ``Gateway``."""

    def __init__(self, settings: Settings, warn: Callable[[str], object] = log.warning,
                 freeze_heap: bool = False) -> None:
        """``freeze_heap``: once serving, move everything loaded so far out of the garbage collector's sight
        (``gc.freeze``). For a process that starts the gateway once (``flywheel up``, ``flywheel gateway``), not
        for one that starts and stops many (tests): frozen cycles are never collected."""
        from flywheel_loop.plugins.serving.gateway.app import create_app

        self.freeze_heap = freeze_heap
        self.settings = settings
        self.gateway = Gateway(settings)
        self.app = create_app(self.gateway)
        self.host = bind_host(GatewayConfig.of(settings), warn)
        if self.gateway.access.open:
            warn("no gateway.keys configured: the gateway is open to anything on this machine")
        # httptools: the C HTTP parser; no access log (a line per call would cost more than the call)
        # proxy_headers off: one middleware less per call (put a proxy's own header handling in the proxy)
        self.server = HostedServer(self.app, self.host, GatewayConfig.of(settings).port, "gateway", backlog=2048,
                                   http="httptools", proxy_headers=False, timeout_keep_alive=30,
                                   timeout_graceful_shutdown=10)

    @property
    def url(self) -> str:
        """The base URL agents use (``http://host:port/v1``)."""
        return self.server.base_url + "/v1"

    async def start(self) -> str:
        """Bind, start the gateway's parts and serve in the background; return the base URL once it answers."""
        self.server.bind()  # a taken port fails before the recorder and the log follower start
        await self.gateway.start()
        await self.server.start()
        # Everything loaded so far (modules, models, schemas) lives as long as the process: out of the collector's
        # sight, a full collection under load no longer walks it (the p99 of a call fell by several ms here).
        if self.freeze_heap:
            gc.collect()
            gc.freeze()
        return self.url

    async def stop(self) -> None:
        """Stop accepting, let calls in flight end, then flush (or spill) the records."""
        await self.server.stop(15)
        await self.gateway.close()

    async def __aenter__(self) -> GatewayServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def gateway_service(ctx: ServiceContext) -> GatewayServer | None:
    """The gateway as a service of ``flywheel up`` (``register_services``): None when ``gateway.enabled`` is false
    or it cannot listen (``ctx.warn`` says why; the engine runs on without it, as without the dashboard)."""
    if not GatewayConfig.of(ctx.settings).enabled:
        return None
    server = GatewayServer(ctx.settings, warn=ctx.warn, freeze_heap=True)
    try:
        await server.start()
    except GatewayUnavailable as exc:
        ctx.warn(f"no gateway: {exc}")
        await server.gateway.close()
        return None
    return server


async def run_gateway(settings: Settings, stop: asyncio.Event, on_ready: Callable[[str], object] | None = None,
                      warn: Callable[[str], object] = log.warning, freeze_heap: bool = True) -> None:
    """Serve the gateway until ``stop`` is set (``on_ready`` gets the base URL once it answers)."""
    server = GatewayServer(settings, warn, freeze_heap)
    url = await server.start()
    if on_ready is not None:
        on_ready(url)
    try:
        await stop.wait()
    finally:
        await server.stop()
