"""The agent-side bandit: choose a prompt variant or a model from local state.

``Selector`` follows ``quality.assessed`` on the log with an ordered consumer and folds it
in memory (``engine.bandit.BanditState``, the same fold as the ``bandit_state``
projection), so ``select_prompt`` and ``select_model`` answer without a round trip
(``bash ops/bench/select --json`` measures them). Each choice is recorded as an
``arm.selected`` event through the SDK's buffered ``Recorder`` (acks, dedupe ids, spill
file), without waiting for it. The reward reaches the arm through the interaction: the
agent records the interaction with the chosen ``prompt_variant`` / ``model_id``, the
scorer's ``quality.assessed`` carries them, and every selector folds it.

    async with Selector(BanditConfig(prompt_variants={"coder": ["terse", "explain"]})) as selector:
        variant = selector.select_prompt("coder")
        model = selector.select_model("coder", complexity="complex", max_cost_per_token=2e-6)

What it asks of NATS is narrow, so an agent's credential can allow exactly that
(``ops/nats/accounts.conf``): it creates push consumers on the log filtered to
``fw.log.quality.assessed`` under a name of its own (the filter is then part of the API subject
``$JS.API.CONSUMER.CREATE.<log>.<name>.fw.log.quality.assessed``), answers their flow control,
asks for the last ``quality.assessed`` by a direct get named by that subject, and publishes its
choices on ``fw.log.arm.selected``. The consumer is ordered: a gap in its sequence, or heartbeats
that stop, start a new one (a new name) after the last message folded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import threading
from collections.abc import Sequence
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from flywheel_loop.schemas import ArmSelected, InvalidEvent, new_event, parse_event, subject_for
from flywheel_loop.schemas.events import Complexity
from flywheel_loop.sdk.bandit import BanditConfig, BanditState, Credit, Decision, make_policy, serves
from flywheel_loop.sdk.client import BusUnavailable, EventPublisher, NatsOptions
from flywheel_loop.sdk.recorder import HasNatsOptions, Recorder

log = logging.getLogger(__name__)

__all__ = ["NoEligibleArm", "Selector"]

SUBJECT = subject_for("quality.assessed")
#: the follower's heartbeat: missing three of them starts a new consumer
HEARTBEAT_S = 2.0


class NoEligibleArm(LookupError):
    """No configured arm fits the request (no variants for the role, or no model under the
    cost cap that handles the complexity)."""


class Selector:
    """Prompt-variant selection and model routing for one agent process."""

    def __init__(
        self,
        bandit: BanditConfig,
        config: NatsOptions | HasNatsOptions | None = None,
        *,
        url: str | None = None,
        source: str = "sdk",
        seed: int | None = None,
        recorder: Recorder | None = None,
    ) -> None:
        """``bandit``: the arms to choose among (``[bandit]`` of the engine's settings); ``config``:
        where the bus is (as for ``Recorder``)."""
        self.bandit = cfg = bandit
        self.policy = make_policy(cfg.policy, cfg.epsilon)
        self.rng = random.Random(seed if seed is not None else cfg.seed)
        self.state = BanditState()
        #: The last log sequence folded into ``state``.
        self.position = 0
        #: records each choice; a server that must not wait on the bus passes its own (the gateway's)
        self.recorder = recorder or Recorder(config, url=url, source=source)
        self._lock = threading.Lock()  # the fold runs on the loop; selects may come from any thread
        self._bus: EventPublisher | None = None
        self._sub: Any = None
        self._consumer = ""  # the name of the consumer being followed
        self._next = 1  # its sequence of the next message
        self._active = 0.0  # when it last showed life (a message or a heartbeat)
        self._restarting = asyncio.Lock()
        self._watchdog: asyncio.Task[None] | None = None

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> Selector:
        """Connect, fold every ``quality.assessed`` on the log, then follow new ones."""
        await self.recorder.start()
        assert self.recorder.options is not None  # start() raised otherwise
        self._bus = await EventPublisher.connect_to(self.recorder.options)
        try:
            await self._follow()
        except nats.js.errors.NotFoundError:
            stream = self._bus.streams.log
            await self.close()
            raise BusUnavailable(f"stream {stream} does not exist: start the engine (`flywheel up`) first") from None
        self._watchdog = asyncio.create_task(self._watch())
        await self.catch_up()
        return self

    async def __aenter__(self) -> Selector:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop following the log; flush the recorded choices."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                await self._sub.unsubscribe()
            self._sub = None
        if self._bus is not None:
            await self._bus.close()
            self._bus = None
        await self.recorder.close()

    async def catch_up(self, timeout: float = 30.0) -> int:
        """Wait until every ``quality.assessed`` now on the log is folded; return the position."""
        assert self._bus is not None
        try:
            last = await self._bus.js.get_last_msg(self._bus.streams.log, SUBJECT, direct=True)
        except nats.js.errors.NotFoundError:
            return self.position  # no rewards yet
        target = int(last.seq or 0)
        deadline = asyncio.get_running_loop().time() + timeout
        while self.position < target:
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"folded the log up to {self.position} of {target} in {timeout}s")
            await asyncio.sleep(0.005)
        return self.position

    # ---------------------------------------------------------------- following the log

    async def _follow(self) -> None:
        """(Re)start the ordered push consumer after the last message folded, under a fresh name."""
        bus = self._bus
        assert bus is not None
        loop = asyncio.get_running_loop()
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                await self._sub.unsubscribe()  # the old consumer goes when it is inactive
            self._sub = None
        name = f"selector_{secrets.token_hex(8)}"
        inbox = bus.nc.new_inbox()
        self._consumer, self._next, self._active = name, 1, loop.time()
        self._sub = await bus.nc.subscribe(inbox, cb=self._on_message)
        start = self.position + 1
        config = ConsumerConfig(
            name=name,
            deliver_subject=inbox,
            filter_subject=SUBJECT,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE if start > 1 else DeliverPolicy.ALL,
            opt_start_seq=start if start > 1 else None,
            ack_policy=AckPolicy.NONE,
            max_deliver=1,
            flow_control=True,
            idle_heartbeat=HEARTBEAT_S,
            mem_storage=True,
            num_replicas=1,
            inactive_threshold=30.0,
        )
        await bus.js.add_consumer(bus.streams.log, config)

    async def _restart(self, why: str) -> None:
        if self._restarting.locked() or self._bus is None:
            return
        async with self._restarting:
            log.info("selector: %s; following %s again from %d", why, SUBJECT, self.position + 1)
            try:
                await self._follow()
            except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
                log.warning("selector: could not follow the log again (%s); retrying", exc)

    async def _watch(self) -> None:
        """Start a new consumer when the current one stopped showing life (a restarted server, a lost one)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            if loop.time() - self._active > 3 * HEARTBEAT_S:
                await self._restart("no heartbeat")

    async def _on_message(self, msg: Msg) -> None:
        bus = self._bus
        if bus is None:
            return
        headers = msg.headers or {}
        if not msg.data and headers.get("Status") == "100":  # flow control or an idle heartbeat
            self._active = asyncio.get_running_loop().time()
            stalled = headers.get("Nats-Consumer-Stalled")
            reply = msg.reply or stalled
            if reply:
                with contextlib.suppress(nats.errors.Error):
                    await bus.nc.publish(reply, b"")
            last = headers.get("Nats-Last-Consumer")
            if last is not None and int(last) != self._next - 1:
                asyncio.get_running_loop().create_task(self._restart("a message was missed"))
            return
        try:
            meta = msg.metadata
        except (ValueError, IndexError, nats.errors.Error):
            return
        if meta.consumer != self._consumer:
            return  # from a consumer given up on
        if meta.sequence.consumer != self._next:
            asyncio.get_running_loop().create_task(self._restart("a message was missed"))
            return
        self._next += 1
        self._active = asyncio.get_running_loop().time()
        self.fold(meta.sequence.stream, msg.data)

    def fold(self, seq: int, raw: bytes) -> None:
        """Fold one log message (a ``quality.assessed``; anything else only moves the position) at ``seq``;
        for a process that follows the log itself (the gateway) instead of calling ``start``."""
        if seq <= self.position:
            return
        try:
            event = parse_event(raw)
        except InvalidEvent:
            event = None  # the bandit_state projection skips it too
        with self._lock:
            if event is not None and event.type == "quality.assessed":
                d = event.data
                self.state.credit(d.interaction_id, Credit(d.role, d.prompt_variant, d.model_id, d.reward))
            self.position = seq

    # ---------------------------------------------------------------- choosing

    def select_prompt(self, role: str) -> str:
        """The prompt variant to use for ``role`` (from ``bandit.prompt_variants``)."""
        variants = self.bandit.prompt_variants.get(role)
        if not variants:
            raise NoEligibleArm(
                f"no prompt variants configured for role {role!r}: set bandit.prompt_variants.{role}"
            )
        return self._choose(role, "prompt_variant", variants)

    def select_model(
        self, role: str, complexity: Complexity | None = None, max_cost_per_token: float | None = None
    ) -> str:
        """The model to route a ``role`` task of ``complexity`` to, among the configured models
        that handle that complexity and cost at most ``max_cost_per_token``."""
        models = self.bandit.models
        candidates = [
            m.name
            for m in models
            if serves(m.max_complexity, complexity)
            and (max_cost_per_token is None or m.cost_per_token <= max_cost_per_token)
        ]
        if not candidates:
            offered = ", ".join(
                f"{m.name} ({m.cost_per_token:g}/token, up to {m.max_complexity})" for m in models
            )
            raise NoEligibleArm(
                f"no model for {role!r} at complexity {complexity or 'any'} under "
                f"{max_cost_per_token if max_cost_per_token is not None else 'any'} per token; "
                f"configured: {offered or 'none (set bandit.models)'}"
            )
        return self._choose(role, "model", candidates, complexity, max_cost_per_token)

    def _choose(
        self,
        role: str,
        decision: Decision,
        candidates: Sequence[str],
        complexity: Complexity | None = None,
        max_cost_per_token: float | None = None,
    ) -> str:
        with self._lock:
            arm = self.policy.choose(candidates, self.state.stats(role, decision), self.rng)
        choice = ArmSelected(
            role=role,
            decision=decision,
            arm=arm,
            policy=self.policy.name,
            candidates=list(candidates),
            complexity=complexity,
            max_cost_per_token=max_cost_per_token,
        )
        self.recorder.enqueue(new_event(choice, source=self.recorder.source))
        return arm
