"""Fixtures for the gateway tests: a real gateway (uvicorn, its own port) on the test's nats-server, in front of
deterministic stub upstreams; deployment events published on the real log as the deployer publishes them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from flywheel_loop.engine.bus import Bus
from flywheel_loop.engine.config import Settings
from flywheel_loop.plugins.serving.gateway.service import GatewayServer
from flywheel_loop.schemas import DeploymentCompleted, DeploymentRolledBack, Event, InteractionRecorded, new_event
from tests.conftest import read_log, wait_for

__all__ = ["deploy", "gateway_settings", "recorded", "roll_back", "running_gateway"]


def gateway_settings(settings_with: Callable[..., Settings], **gateway: Any) -> Settings:
    base = {"port": 0, "spill_after_s": 0.5}
    return settings_with(gateway={**base, **gateway})


@asynccontextmanager
async def running_gateway(settings: Settings) -> AsyncIterator[GatewayServer]:
    server = GatewayServer(settings)
    await server.start()
    try:
        await wait_for(lambda: server.gateway.follower.subscribed.is_set(), 30)
        yield server
    finally:
        await server.stop()


async def _publish_and_wait(bus: Bus, server: GatewayServer, data: Any) -> Event[Any]:
    event = new_event(data, source="deployer")
    ack = await bus.publish(event)
    await wait_for(lambda: server.gateway.table.position >= ack.seq, 30)
    return event


async def deploy(bus: Bus, server: GatewayServer, role: str, name: str, endpoint: str, share: float = 1.0,
                 previous: str | None = None) -> Event[Any]:
    """A ``deployment.completed`` on the log, folded by the gateway before this returns."""
    data = DeploymentCompleted(role=role, runtime="transformers", model_name=name, adapter_hash=None,
                               traffic_share=share, endpoint=endpoint, previous_model_name=previous)
    return await _publish_and_wait(bus, server, data)


async def roll_back(bus: Bus, server: GatewayServer, role: str, source: str, target: str,
                    endpoint: str) -> Event[Any]:
    data = DeploymentRolledBack(role=role, runtime="transformers", reason="test", from_model_name=source,
                                to_model_name=target, trigger="manual", endpoint=endpoint)
    return await _publish_and_wait(bus, server, data)


async def recorded(bus: Bus, server: GatewayServer, count: int, timeout: float = 30.0) -> list[Event[Any]]:
    """The interactions on the raw stream once ``count`` of them are there (after flushing the gateway)."""
    await server.gateway.recorder.flush(timeout)

    async def enough() -> list[Event[Any]] | None:
        events = await read_log(bus, "raw", "interaction.recorded")
        return events if len(events) >= count else None

    events: list[Event[Any]] = await wait_for(enough, timeout)
    assert all(isinstance(e.data, InteractionRecorded) for e in events)
    return events
