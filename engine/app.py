"""The engine: every enabled processor, projection and service, running against one bus."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from flywheel_loop.engine.bus import Bus
from flywheel_loop.engine.config import Settings
from flywheel_loop.engine.plugin_host import PluginHost
from flywheel_loop.engine.projection import Projection, ProjectionRunner
from flywheel_loop.engine.services import RunningService, Service, ServiceContext
from flywheel_loop.engine.worker import ProcessorWorker

log = logging.getLogger(__name__)


def projection_path(settings: Settings, projection: Projection) -> Path:
    return settings.layout.projection(projection.name)


@dataclass
class Engine:
    """Runs processors on durable consumers, projections on the log and services until stopped."""

    bus: Bus
    host: PluginHost
    only: set[str] | None = None
    workers: list[ProcessorWorker] = field(default_factory=list)
    runners: list[ProjectionRunner] = field(default_factory=list)
    services: list[Service] = field(default_factory=list)
    running: list[tuple[str, RunningService]] = field(default_factory=list)

    @property
    def settings(self) -> Settings:
        return self.bus.settings

    def _selected(self, name: str) -> bool:
        if name in self.settings.plugins.skip:
            return False
        return self.only is None or name in self.only

    def prepare(self) -> None:
        self.host.configure()
        self.workers = [
            ProcessorWorker(self.bus, p, self.host) for p in self.host.processors() if self._selected(p.name)
        ]
        self.runners = [
            ProjectionRunner(self.bus, p, projection_path(self.settings, p))
            for p in self.host.projections()
            if self._selected(p.name)
        ]
        self.services = [s for s in self.host.services() if self._selected(s.name)]

    async def start_services(self, warn: Callable[[str], None] = log.warning) -> list[tuple[str, RunningService]]:
        """Start the services; one that fails to start is a warning, and the engine runs without it."""
        for service in self.services:
            logger = logging.getLogger(f"flywheel.{service.name}")
            ctx = ServiceContext(self.settings, self.bus, self.host, logger, warn)
            try:
                started = await service.start(ctx)
            except Exception as exc:  # a plugin may raise anything; the engine keeps running
                warn(f"service {service.name} did not start: {exc}")
                continue
            if started is not None:
                self.running.append((service.name, started))
        return self.running

    async def stop_services(self) -> None:
        while self.running:
            name, service = self.running.pop()
            try:
                await service.stop()
            except Exception:
                log.exception("service %s did not stop cleanly", name)

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set; in-flight batches finish first (drain)."""
        if not self.workers and not self.runners:
            self.prepare()
        # What start-up loaded (plugins, the scrubber's rules, phone metadata, models' code) lives as long as
        # the engine: moved out of the collector's generations, it is no longer traversed by every full
        # collection, which the events' short-lived objects trigger (a fifth of the pipeline's CPU time
        # before, measured with ops/bench/pipeline). Handed back to the collector when the engine stops.
        gc.collect()
        gc.freeze()
        loops: list[tuple[str, Callable[[asyncio.Event], Awaitable[None]]]] = [
            (w.processor.name, w.run) for w in self.workers
        ]
        loops += [(r.projection.name, r.run) for r in self.runners]
        tasks = [asyncio.create_task(_supervise(name, run, stop), name=name) for name, run in loops]
        log.info("engine running %d processors, %d projections", len(self.workers), len(self.runners))
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            for runner in self.runners:
                runner.close()
            for worker in self.workers:
                worker.close()
            gc.unfreeze()


async def _supervise(name: str, run: Callable[[asyncio.Event], Awaitable[None]], stop: asyncio.Event) -> None:
    """Keep one worker or projection running: an unexpected error (a lost server mid-call)
    is logged and the loop restarts after a pause; its consumer resumes where it was."""
    delay = 0.5
    while not stop.is_set():
        try:
            await run(stop)
            return
        except Exception:
            log.exception("%s stopped unexpectedly; restarting in %.1fs", name, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
