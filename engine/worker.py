"""The worker runtime: runs one processor on its durable pull consumer.

For each fetched batch: validate every message, call the processor, publish what it
produced (ids derived from input id + processor name + index, so a redelivery never
duplicates), and ack each input only after its outputs are acked.

- A message that does not validate becomes an ``event.rejected`` and is terminated.
- A handler that raises is redelivered with exponential back-off (``nak`` with a delay,
  so retries survive a crash); after ``max_attempts`` it is rejected and terminated.
- ``stop`` lets the current batch finish (drain) before the worker returns.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from flywheel_loop.engine import telemetry
from flywheel_loop.engine.bus import Bus, PublishFailed
from flywheel_loop.engine.processor import Outputs, ProcessContext, Processor, apply_step
from flywheel_loop.engine.state import ProcessorState
from flywheel_loop.schemas import (
    Event,
    EventRejected,
    InvalidEvent,
    Payload,
    derived_event,
    new_event,
    parse_event,
)
from flywheel_loop.schemas.ids import ID_PATTERN, derive_id, new_id

if TYPE_CHECKING:
    from flywheel_loop.engine.plugin_host import PluginHost

log = logging.getLogger(__name__)


@dataclass
class WorkerStats:
    processed: int = 0
    produced: int = 0
    rejected: int = 0
    retried: int = 0
    started: float = field(default_factory=time.monotonic)


def rejection_event(
    msg: Msg, stream_name: str, processor: str, reason: str, attempts: int, original_id: str | None
) -> Event[Any]:
    """An ``event.rejected`` whose id is derived from (stream, sequence, processor)."""
    seq = msg.metadata.sequence.stream
    data = EventRejected(
        subject=msg.subject[:2000],
        stream_name=stream_name,
        sequence=seq,
        processor=processor,
        reason=reason[:10_000] or "unknown error",
        attempts=attempts,
        original_id=original_id[:200] if original_id else None,
    )
    if original_id and re.fullmatch(ID_PATTERN, original_id):
        anchor = original_id
    else:  # no usable id: anchor on the message's stored time, so the id stays deterministic
        stamp = msg.metadata.timestamp
        anchor = new_id(int(stamp.timestamp() * 1000) if stamp else 0)[:10] + "0" * 16
    return new_event(
        data,
        source=processor,
        event_id=derive_id(anchor, stream_name, seq, processor, "rejected"),
        correlation_id=None,
    )


class ProcessorWorker:
    """Consumes for one processor until stopped."""

    def __init__(self, bus: Bus, processor: Processor, plugins: PluginHost | None = None) -> None:
        self.bus = bus
        self.processor = processor
        self.cfg = bus.settings.worker
        self.stats = WorkerStats()
        layout = bus.settings.layout
        self.store = (
            ProcessorState(layout.processor(processor.name) / "state.sqlite", processor.tables)
            if processor.stateful else None
        )
        self.ctx = ProcessContext(
            settings=bus.settings,
            log=logging.getLogger(f"flywheel.{processor.name}"),
            plugins=plugins,
            store=self.store,
            reader=self._read_log,
            emitter=self._emit,
            artifacts=bus.artifacts,
        )
        self._current: Event[Any] | None = None
        self._started = False
        self.stream_name = bus.streams.for_stream(processor.stream)
        self._sub: Any = None
        self._trace: dict[str, dict[str, str]] = {}

    def consumer_config(self) -> ConsumerConfig:
        p = self.processor
        config = ConsumerConfig(
            durable_name=p.name,
            name=p.name,
            description=p.description or None,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=self.cfg.ack_wait_s,
            max_deliver=-1,  # the worker decides when to give up, so it can record why
            max_ack_pending=max(4 * (p.batch or self.cfg.batch), 1000),
        )
        if len(p.subjects) == 1:
            config.filter_subject = p.subjects[0]
        else:
            config.filter_subjects = p.subjects
        return config

    async def subscribe(self) -> None:
        await self.bus.js.add_consumer(self.stream_name, self.consumer_config())
        self._sub = await self.bus.js.pull_subscribe_bind(
            durable=self.processor.name, stream=self.stream_name
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Fetch and process batches until ``stop`` is set; the batch in hand is finished."""
        batch = self.processor.batch or self.cfg.batch
        if not self._started and self.processor.on_start is not None:
            self.ctx.loop = asyncio.get_running_loop()
            self.processor.on_start(self.ctx)
        self._started = True
        while not stop.is_set():
            try:
                if self._sub is None:
                    await self.subscribe()
                msgs = await self._sub.fetch(batch, timeout=self.cfg.fetch_timeout_s)
            except nats.errors.TimeoutError:
                continue
            except (TimeoutError, nats.errors.Error, nats.js.errors.Error, OSError) as exc:
                log.info("%s: fetch failed (%s); retrying", self.processor.name, exc)
                self._sub = None
                await asyncio.sleep(0.5)
                continue
            await self.process_batch(msgs)

    async def process_batch(self, msgs: list[Msg]) -> None:
        """Handle a batch; publish all outputs (pipelined), then ack the inputs."""
        done: list[tuple[Msg, bool]] = []
        outputs: list[Event[Any]] = []
        self._trace = {}
        for msg in msgs:
            handled = await self._handle(msg)
            if handled is None:
                continue  # nak'd for a retry
            produced, rejected = handled
            outputs.extend(produced)
            done.append((msg, rejected))
        try:
            await self.bus.publish_many(outputs, trace=self._trace)
        except PublishFailed as exc:
            log.error("%s: could not publish outputs (%s); inputs will be redelivered", self.processor.name, exc)
            return
        for msg, rejected in done:
            # A rejected message is terminated (never redelivered) once its rejection is stored.
            await (self._term(msg) if rejected else msg.ack())
        self.stats.produced += len(outputs)

    async def _handle(self, msg: Msg) -> tuple[list[Event[Any]], bool] | None:
        """(outputs, rejected?) for one message, or None when it was nak'd for a retry."""
        name = self.processor.name
        attempts = int(msg.metadata.num_delivered or 1)
        msg_id = (msg.headers or {}).get("Nats-Msg-Id")
        try:
            event = parse_event(msg.data)
            if event.subject != msg.subject:
                raise InvalidEvent(f"type: {event.type!r} published on subject {msg.subject!r}")
        except InvalidEvent as exc:
            self.stats.rejected += 1
            return [rejection_event(msg, self.stream_name, name, exc.reason, attempts, msg_id)], True
        self.ctx.attempt = attempts
        self.ctx.sequence = int(msg.metadata.sequence.stream)
        try:
            if telemetry.enabled():
                with telemetry.span_from_headers(
                    f"process {name}", msg.headers, **{"flywheel.event_type": event.type, "flywheel.event_id": event.id}
                ):
                    produced = await self.handle_event(event, msg)
                    carrier: dict[str, str] = {}
                    telemetry.inject(carrier)  # the outputs continue this span's trace
                    for out in produced:
                        self._trace[out.id] = carrier
            else:
                produced = await self.handle_event(event, msg)
        except Exception as exc:  # a plugin may raise anything; it must not stop the worker
            if attempts < self.cfg.max_attempts:
                delay = min(self.cfg.backoff_s * 2 ** (attempts - 1), self.cfg.max_backoff_s)
                log.warning("%s failed on %s (attempt %d): %r; retry in %.1fs", name, event.id, attempts, exc, delay)
                self.stats.retried += 1
                await msg.nak(delay=delay)
                return None
            self.stats.rejected += 1
            reason = f"{name} raised {type(exc).__name__}: {exc} (after {attempts} attempts)"
            return [rejection_event(msg, self.stream_name, name, reason, attempts, event.id)], True
        self.stats.processed += 1
        return produced, False

    async def handle_event(self, event: Event[Any], msg: Msg | None = None) -> list[Event[Any]]:
        """Run the handler (inside the state transaction for a stateful processor, or answer from
        the memo) and wrap what it returns in envelopes with derived ids. ``msg``, when the event
        came from the consumer, is kept alive while a long handler runs."""
        self._current = event
        self.ctx.loop = asyncio.get_running_loop()
        produced = await apply_step(self.processor, event, self.ctx, self._patient(msg))
        name = self.processor.name
        return [derived_event(p, cause=event, source=name, index=i) for i, p in enumerate(produced)]

    def _patient(self, msg: Msg | None) -> Callable[[Awaitable[Outputs]], Awaitable[Outputs]] | None:
        """How to wait for a long step: tell JetStream the message is in progress meanwhile, well
        before ack_wait would redeliver it elsewhere (a dataset build, a training run)."""
        if msg is None:
            return None

        async def wait(result: Awaitable[Outputs]) -> Outputs:
            heartbeat = asyncio.create_task(self._keep_alive(msg))
            try:
                return await result
            finally:
                heartbeat.cancel()

        return wait

    async def _read_log(self, types: Sequence[str], until: int | None) -> list[tuple[int, Event[Any]]]:
        return await self.bus.read_log(types, until)

    async def _emit(self, payload: Payload, index: int) -> None:
        if self._current is None:
            raise RuntimeError("nothing is being handled: a live event needs the input that causes it")
        # live events get ids derived from the input and an index the step chooses (offset so they
        # never collide with the handler's returned outputs, which are numbered from 0)
        out = derived_event(payload, cause=self._current, source=self.processor.name, index=100_000 + index)
        try:
            await self.bus.publish(out)
        except PublishFailed as exc:  # progress is best effort; the final outputs are not
            self.ctx.log.warning("%s could not publish %s: %s", self.processor.name, payload.event_type, exc)

    async def _keep_alive(self, msg: Msg) -> None:
        while True:
            await asyncio.sleep(self.cfg.ack_wait_s / 3)
            try:
                await msg.in_progress()
            except nats.errors.Error:
                return

    def close(self) -> None:
        if self.processor.on_stop is not None and self._started:
            self.processor.on_stop()
        if self.store is not None:
            self.store.close()

    @staticmethod
    async def _term(msg: Msg) -> None:
        try:
            await msg.term()
        except nats.errors.Error:
            pass
