"""Shared fixtures: every test that needs a bus gets a real nats-server of its own."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from flywheel_loop.engine.app import Engine  # noqa: E402
from flywheel_loop.engine.bus import Bus  # noqa: E402
from flywheel_loop.engine.config import Settings, load_settings  # noqa: E402
from flywheel_loop.engine.embedded import EmbeddedServer  # noqa: E402
from flywheel_loop.engine.plugin_host import PluginHost  # noqa: E402
from flywheel_loop.engine.projection import Projection, ProjectionRunner  # noqa: E402


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    """A fresh nats-server with JetStream on a free port; the test may kill or restart it."""
    server = EmbeddedServer(tmp_path / "nats").start()
    yield server
    server.stop()


@pytest.fixture
def settings_with(
    tmp_path: Path, nats_server: EmbeddedServer, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., Settings]:
    """Settings for this test's server and state folder, plus any sections a test overrides."""
    monkeypatch.chdir(tmp_path)  # no stray flywheel.toml is read

    def make(**sections: Any) -> Settings:
        # The trainer would fine-tune the real base model on any dataset a test builds;
        # tests/test_trainer.py turns it back on with a tiny model. Likewise the deployer would load
        # and serve the real base model for any passed evaluation (tests/test_deployer.py uses a tiny one).
        sections.setdefault("plugins", {"skip": ["trainer", "evaluator", "deployer"]})
        return load_settings(
            state_dir=tmp_path / "state",
            nats={"url": nats_server.url, "publish_retry_s": 30},
            worker={"fetch_timeout_s": 0.2, "backoff_s": 0.05, "max_backoff_s": 0.2},
            **sections,
        )

    return make


@pytest.fixture
def settings(settings_with: Callable[..., Settings]) -> Settings:
    return settings_with()


@pytest.fixture
async def bus(settings: Settings) -> AsyncIterator[Bus]:
    b = await Bus.connect(settings, settings.nats.url or "")
    await b.ensure_streams()
    yield b
    await b.close()


class RunningEngine:
    """An engine running in the background of a test, with helpers to wait on it."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> RunningEngine:
        self.engine.prepare()
        self.task = asyncio.create_task(self.engine.run(self.stop))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        assert self.task is not None
        await asyncio.wait_for(self.task, 30)

    def projection(self, name: str) -> ProjectionRunner:
        return next(r for r in self.engine.runners if r.projection.name == name)


@pytest.fixture
def engine_with(bus: Bus, settings: Settings) -> Callable[..., RunningEngine]:
    """``async with engine_with(plugin, ...) as running:`` runs the built-ins plus test plugins."""

    def make(*plugins: Any, builtins: bool = True, only: set[str] | None = None) -> RunningEngine:
        host = PluginHost(settings, load_entry_points=builtins)
        for i, plugin in enumerate(plugins):
            host.register(plugin, name=f"test-plugin-{i}")
        return RunningEngine(Engine(bus, host, only=only))

    return make


async def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test on timeout."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


async def read_log(bus: Bus, stream: str = "log", event_type: str | None = None) -> list[Any]:
    """Every event on a stream (optionally one type), opened as the engine reads it (sealed personal text
    decrypted; a forgotten subject's left blank with ``forgotten`` set), in order."""
    return [event for _, event in await read_log_at(bus, stream, event_type)]


async def read_log_at(bus: Bus, stream: str = "log", event_type: str | None = None) -> list[tuple[int, Any]]:
    """Every event on a stream (optionally one type) with its stream sequence, opened as ``read_log``
    opens it, in order."""
    subject = f"fw.{stream}.{event_type}" if event_type else f"fw.{stream}.>"
    last = await bus.last_sequence(stream)
    if last == 0:
        return []
    sub = await bus.js.subscribe(subject, ordered_consumer=True, stream=bus.streams.for_stream(stream))
    events = []
    try:
        info = await bus.js.stream_info(bus.streams.for_stream(stream), subjects_filter=subject)
        expected = sum((info.state.subjects or {}).values()) if info.state.subjects else 0
        while len(events) < expected:
            msg = await sub.next_msg(timeout=5)
            events.append((msg.metadata.sequence.stream, await bus.keys.open(msg.data)))
    finally:
        await sub.unsubscribe()
    return events


__all__ = ["Projection", "RunningEngine", "read_log", "read_log_at", "wait_for"]
