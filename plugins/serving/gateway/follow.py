"""Following the log: deployments for routing, rewards for the bandits, recent interactions for feedback.

The gateway keeps its routing table, its bandit statistics and its list of whose interactions are whose as
folds of the log, through ordered consumers on a connection of its own, so every gateway (and a restarted one)
knows the same as the others without sharing anything but NATS. The bus may be down when the gateway starts or
go down later: the follower keeps trying, and nats-py's ordered consumers resume where they were after a
reconnect. Calls are served meanwhile from what was folded so far.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import nats.errors
import nats.js.errors
import orjson
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy

from flywheel_loop.engine.bus import Bus, BusUnavailable
from flywheel_loop.engine.config import Settings
from flywheel_loop.engine.connection import running_embedded_url
from flywheel_loop.plugins.serving.gateway.recording import Owner, Owners
from flywheel_loop.plugins.serving.gateway.routing import ServiceTable
from flywheel_loop.plugins.serving.gateway.settings import GatewayConfig
from flywheel_loop.schemas import InvalidEvent, parse_event

__all__ = ["LogFollower"]

log = logging.getLogger(__name__)

DEPLOYMENTS = "fw.log.deployment.>"
REWARDS = "fw.log.quality.assessed"
INTERACTIONS = "fw.raw.interaction.recorded"


class LogFollower:
    """Folds the log into the gateway's table, selector and owners until stopped."""

    def __init__(self, settings: Settings, table: ServiceTable, owners: Owners,
                 fold_reward: Callable[[int, bytes], None] | None = None) -> None:
        self.settings = settings
        self.table = table
        self.owners = owners
        self.fold_reward = fold_reward
        self.bus: Bus | None = None
        self.subscribed = asyncio.Event()
        self._subs: list[Any] = []

    async def run(self, stop: asyncio.Event) -> None:
        delay = 0.1
        while not stop.is_set():
            try:
                await self._follow()
            except (BusUnavailable, nats.errors.Error, nats.js.errors.Error, OSError, TimeoutError) as exc:
                log.info("gateway: log not followed yet (%s); retrying", exc)
                await self._unsubscribe()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(delay * 2, 2.0)
                continue
            await stop.wait()
        await self._unsubscribe()
        if self.bus is not None:
            await self.bus.close()
            self.bus = None

    async def _follow(self) -> None:
        if self.bus is None:
            url = self.settings.nats.url or running_embedded_url(self.settings)
            if url is None:
                raise BusUnavailable("no NATS URL configured and no engine running")
            self.bus = await Bus.connect(self.settings, url)
        bus = self.bus
        try:
            await bus.ensure_streams(wait_s=5.0)
        except Exception as exc:  # e.g. an agent credential that may not manage streams: the engine makes them
            log.debug("gateway: streams not ensured: %s", exc)
        self._subs.append(await bus.js.subscribe(DEPLOYMENTS, stream=bus.streams.log, ordered_consumer=True,
                                                 cb=self._on_deployment))
        if self.fold_reward is not None:
            self._subs.append(await bus.js.subscribe(REWARDS, stream=bus.streams.log, ordered_consumer=True,
                                                     cb=self._on_reward))
        since = datetime.now(UTC) - timedelta(hours=GatewayConfig.of(self.settings).feedback_lookback_h)
        config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=since)
        self._subs.append(await bus.js.subscribe(INTERACTIONS, stream=bus.streams.raw, ordered_consumer=True,
                                                 config=config, cb=self._on_interaction))
        self.subscribed.set()

    async def _unsubscribe(self) -> None:
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()
        self.subscribed.clear()

    async def _on_deployment(self, msg: Msg) -> None:
        seq = msg.metadata.sequence.stream
        try:
            event = parse_event(msg.data)
        except InvalidEvent:
            self.table.position = max(self.table.position, seq)
            return
        self.table.apply(event, seq)

    async def _on_reward(self, msg: Msg) -> None:
        assert self.fold_reward is not None
        self.fold_reward(msg.metadata.sequence.stream, msg.data)

    async def _on_interaction(self, msg: Msg) -> None:
        # Only ids, sessions and keys are needed: a plain JSON read, not the full validation; and none at all for
        # the interactions this gateway made itself (it noted them as it served them).
        known = msg.headers.get("Nats-Msg-Id") if msg.headers else None
        if known is not None and self.owners.get(known) is not None:
            return
        if msg.data.endswith(b'"gateway":null}}'):  # the last field of the last part: an agent recorded it
            return
        try:
            raw = orjson.loads(msg.data)
            data = raw["data"]
            call = data.get("gateway")
            if call is None or self.owners.get(raw["id"]) is not None:
                return
            self.owners.add(raw["id"], Owner(call.get("key"), str(data["session_id"]), True))
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
            return

    async def deployments_position(self) -> int:
        """The last sequence of a deployment event on the log now (0: none), to wait for the table to reach it."""
        if self.bus is None:
            return 0
        try:
            msg = await self.bus.js.get_last_msg(self.bus.streams.log, DEPLOYMENTS)
        except nats.js.errors.NotFoundError:
            return 0
        return int(msg.seq or 0)
