"""The engine: every enabled processor and projection, running against one bus."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from engine.bus import Bus
from engine.config import Settings
from engine.plugin_host import PluginHost
from engine.processor import Processor
from engine.projection import Projection, ProjectionRunner
from engine.worker import ProcessorWorker

log = logging.getLogger(__name__)


def projection_path(settings: Settings, projection: Projection) -> Path:
    return settings.state_dir / "projections" / f"{projection.name}.sqlite"


@dataclass
class Engine:
    """Runs processors on durable consumers and projections on the log until stopped."""

    bus: Bus
    host: PluginHost
    only: set[str] | None = None
    workers: list[ProcessorWorker] = field(default_factory=list)
    runners: list[ProjectionRunner] = field(default_factory=list)

    @property
    def settings(self) -> Settings:
        return self.bus.settings

    def _selected(self, name: str) -> bool:
        return self.only is None or name in self.only

    def prepare(self) -> None:
        self.host.configure()
        processors: list[Processor] = [p for p in self.host.processors() if self._selected(p.name)]
        projections: list[Projection] = [p for p in self.host.projections() if self._selected(p.name)]
        state = self.settings.state_dir
        hooks = self.host.pm.hook
        self.workers = [
            ProcessorWorker(self.bus, p, state / "processors" / p.name, hooks) for p in processors
        ]
        self.runners = [
            ProjectionRunner(self.bus, p, projection_path(self.settings, p)) for p in projections
        ]

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set; in-flight batches finish first (drain)."""
        if not self.workers and not self.runners:
            self.prepare()
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
