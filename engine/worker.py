"""The worker runtime: runs one processor on its durable pull consumer.

For each fetched batch: open every message (validate it, and decrypt its sealed personal
text, ``engine/sealing.py``), call the processor, publish what it produced (ids derived from
input id + processor name + index), and ack each input only after its outputs are acked.

- A message that does not validate becomes an ``event.rejected`` and is terminated.
- A handler that raises is redelivered with exponential back-off (``nak`` with a delay,
  so retries survive a crash); after ``max_attempts`` it is rejected and terminated.
- An event whose data subject was forgotten (its key destroyed) is acked without calling the
  handler: nothing new is derived from forgotten data. An output about a forgotten subject
  (late intake for it) is not published.
- **Exactly once, also after the duplicate window.** Within ``streams.duplicate_window_s``
  JetStream drops an output published twice under its derived id. A redelivered input (JetStream
  counts deliveries) may come back later than that: a worker killed between publishing and
  acking, a consumer paused or backed off for longer. For such an input the worker looks its
  outputs' ids up on the log before publishing, among the messages stored since the input itself
  was stored (headers only; outputs always come after their input), and publishes only those
  not there. This holds for every processor, stateless ones included (the anonymizer, the
  embedder, any plugin's), and needs no state: the log is the record of what was published.
- A key store that does not answer leaves the batch unacked (naked with a delay), with the reason
  logged: nothing is rejected for it.
- ``stop`` lets the current batch finish (drain) before the worker returns.
- **Batches in flight.** A stateless processor's worker does not wait for a batch's outputs to be
  acked before it fetches and handles the next: up to ``worker.in_flight`` batches may be waiting
  for their acks at once (the round trips to JetStream overlap the next batch's work). Each input
  is still acked only after its own outputs are; outputs of two batches in flight may be stored in
  either order, which no stateless step depends on. A stateful processor handles one batch at a
  time: its state is folded from the log, up to the previous batch's outputs, before the next.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from flywheel_loop.engine import telemetry
from flywheel_loop.engine.bus import Bus, PublishFailed, fetch_batch
from flywheel_loop.engine.keys import KeyStoreError
from flywheel_loop.engine.processor import Outputs, ProcessContext, Processor, apply_step
from flywheel_loop.engine.projection import ProjectionRunner
from flywheel_loop.engine.sealing import Opened
from flywheel_loop.engine.state import ProcessorFold, ProcessorState, live_source
from flywheel_loop.schemas import (
    Event,
    EventRejected,
    InvalidEvent,
    Payload,
    derived_event,
    new_event,
)
from flywheel_loop.schemas.ids import ID_PATTERN, derive_id, new_id

if TYPE_CHECKING:
    from flywheel_loop.engine.plugin_host import PluginHost

log = logging.getLogger(__name__)

#: a handled input: its message, whether it was rejected, and what it produced
Handled = tuple[Msg, bool, list[Event[Any]]]

#: how far apart two servers' clocks may be: an output is looked for from this long before its input's
#: store time (in a cluster the input's and the output's streams may have leaders on different servers)
CLOCK_SKEW = timedelta(seconds=60)


@dataclass
class WorkerStats:
    processed: int = 0
    produced: int = 0
    rejected: int = 0
    retried: int = 0
    #: outputs of redelivered inputs found on the log already, so not published again
    already_stored: int = 0
    #: inputs about a forgotten data subject, acked without calling the handler
    forgotten: int = 0
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
        self.fold: ProjectionRunner | None = None
        self.store: ProcessorState | None = None
        if processor.stateful:
            path = bus.settings.layout.processor(processor.name) / "state.sqlite"
            self.fold = ProjectionRunner(bus, ProcessorFold(processor), path, secure_delete=True)
            self.store = ProcessorState(self.fold.store)
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
            await self.catch_up()
            self.processor.on_start(self.ctx)
        self._started = True
        limit = 1 if self.processor.stateful else self.cfg.in_flight
        in_flight: set[asyncio.Task[None]] = set()
        try:
            while not stop.is_set():
                try:
                    if self._sub is None:
                        await self.subscribe()
                    msgs = await fetch_batch(self._sub, batch, self.cfg.fetch_timeout_s)
                except nats.errors.TimeoutError:
                    continue
                except (TimeoutError, nats.errors.Error, nats.js.errors.Error, OSError) as exc:
                    log.info("%s: fetch failed (%s); retrying", self.processor.name, exc)
                    self._sub = None
                    await asyncio.sleep(0.5)
                    continue
                if limit <= 1:
                    await self.process_batch(msgs)
                    continue
                handled = await self.handle_batch(msgs)
                if handled is None:
                    continue
                while len(in_flight) >= limit:
                    finished, _ = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                    in_flight -= finished
                    for task in finished:
                        task.result()  # an unexpected error stops the worker, as without batches in flight
                in_flight.add(asyncio.create_task(self.publish_and_ack(*handled)))
        finally:
            if in_flight:  # drain: every batch handled has its outputs published and its inputs acked
                await asyncio.gather(*in_flight, return_exceptions=True)

    async def catch_up(self) -> None:
        """Bring a stateful processor's fold up to the end of the log (everything other processes
        handled, and this processor's own outputs, so it knows what is answered)."""
        if self.fold is None or self.store is None:
            return
        await self.fold.follow_up()
        self.store.settle()

    async def process_batch(self, msgs: list[Msg]) -> None:
        """Handle a batch; publish all outputs not yet on the log (pipelined), then ack the inputs."""
        handled = await self.handle_batch(msgs)
        if handled is not None:
            await self.publish_and_ack(*handled)

    async def handle_batch(self, msgs: list[Msg]) -> tuple[list[Handled], dict[str, dict[str, str]]] | None:
        """Run the step on a batch: (message, rejected?, outputs) for each input not nak'd for a retry, and
        the outputs' trace headers; None when the whole batch was handed back (nak'd)."""
        name = self.processor.name
        try:
            await self.catch_up()
        except Exception as exc:  # the fold could not read the log: hand the batch back for later
            log.warning("%s: its state could not be brought up to date (%r); the batch is retried", name, exc)
            for msg in msgs:
                await self._nak(msg, self.cfg.backoff_s)
            return None
        try:
            opened = await self.bus.open_many([msg.data for msg in msgs])
        except KeyStoreError as exc:
            log.error("%s: %s; the batch is retried", name, exc)
            for msg in msgs:
                await self._nak(msg, self.cfg.max_backoff_s)
            return None
        done: list[Handled] = []
        trace: dict[str, dict[str, str]] = {}  # this batch's: a batch in flight keeps its own
        self._trace = trace
        for msg, item in zip(msgs, opened, strict=True):
            handled = await self._handle(msg, item)
            if handled is None:
                continue  # nak'd for a retry
            produced, rejected = handled
            done.append((msg, rejected, produced))
        return done, trace

    async def publish_and_ack(self, done: list[Handled], trace: dict[str, dict[str, str]]) -> None:
        """Publish a handled batch's outputs not yet on the log (pipelined), then ack its inputs."""
        name = self.processor.name
        try:
            outputs = await self._not_yet_stored(done)
            outputs = await self.bus.keys.writable(outputs)
            await self.bus.publish_many(outputs, trace=trace)
        except KeyStoreError as exc:
            log.error("%s: could not seal outputs (%s); the batch is retried", name, exc)
            for msg, _, _ in done:
                await self._nak(msg, self.cfg.max_backoff_s)
            return
        except (PublishFailed, nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            log.error("%s: could not publish outputs (%s); inputs will be redelivered", name, exc)
            return
        for msg, rejected, _ in done:
            # A rejected message is terminated (never redelivered) once its rejection is stored.
            await (self._term(msg) if rejected else msg.ack())
        self.stats.produced += len(outputs)

    async def _not_yet_stored(self, done: list[Handled]) -> list[Event[Any]]:
        """The batch's outputs, less those of redelivered inputs that are on the log already (see the
        module docstring: exactly once after the duplicate window)."""
        outputs = [out for _, _, produced in done for out in produced]
        again = [(msg, produced) for msg, _, produced in done if produced and int(msg.metadata.num_delivered or 1) > 1]
        stamps = [msg.metadata.timestamp for msg, _ in again if msg.metadata.timestamp is not None]
        if not again:
            return outputs
        # without a store time (never the case for a JetStream message) look from the start of the stream
        since = min(stamps) - CLOCK_SKEW if len(stamps) == len(again) else datetime.fromtimestamp(0, UTC)
        stored = await self.bus.stored_ids([out for _, produced in again for out in produced], since)
        if stored:
            log.info("%s: %d output(s) of redelivered inputs are on the log already; not published again",
                     self.processor.name, len(stored))
            self.stats.already_stored += len(stored)
        return [out for out in outputs if out.id not in stored]

    async def _handle(self, msg: Msg, item: Opened) -> tuple[list[Event[Any]], bool] | None:
        """(outputs, rejected?) for one opened message, or None when it was nak'd for a retry."""
        name = self.processor.name
        attempts = int(msg.metadata.num_delivered or 1)
        msg_id = (msg.headers or {}).get("Nats-Msg-Id")
        try:
            if isinstance(item, InvalidEvent):
                raise item
            event = item
            if event.subject != msg.subject:
                raise InvalidEvent(f"type: {event.type!r} published on subject {msg.subject!r}")
        except InvalidEvent as exc:
            self.stats.rejected += 1
            return [rejection_event(msg, self.stream_name, name, exc.reason, attempts, msg_id)], True
        if event.forgotten:
            self.stats.forgotten += 1
            return [], False  # its subject was forgotten: nothing is derived from it
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
                await self._nak(msg, delay)
                return None
            self.stats.rejected += 1
            reason = f"{name} raised {type(exc).__name__}: {exc} (after {attempts} attempts)"
            return [rejection_event(msg, self.stream_name, name, reason, attempts, event.id)], True
        self.stats.processed += 1
        return produced, False

    async def handle_event(self, event: Event[Any], msg: Msg | None = None) -> list[Event[Any]]:
        """Run the step (for a stateful processor, nothing when the input is answered on the log)
        and wrap what it returns in envelopes with derived ids. ``msg``, when the event came from
        the consumer, is kept alive while a long handler runs."""
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
        # live events come from "<name>:live" (they never mark the input answered) with ids derived
        # from the input and an index the step chooses
        out = derived_event(payload, cause=self._current, source=live_source(self.processor.name), index=index)
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
        if self.fold is not None:
            self.fold.close()

    @staticmethod
    async def _term(msg: Msg) -> None:
        try:
            await msg.term()
        except nats.errors.Error:
            pass

    @staticmethod
    async def _nak(msg: Msg, delay: float) -> None:
        try:
            await msg.nak(delay=delay)
        except nats.errors.Error:
            pass  # redelivered after ack_wait instead
