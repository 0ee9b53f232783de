"""The agent SDK: record interactions, feedback and outcomes without slowing the agent.

``Recorder`` (asyncio) and ``SyncRecorder`` (any thread) validate each event on the
caller's side (a bad field raises at once, naming it), put it in a bounded buffer and
return its id; a background task publishes the buffer in pipelined batches with acks and
dedupe ids, several batches (``in_flight``, 4 by default) waiting for their acks at once.
Nothing is dropped silently:

- a full buffer makes the caller wait up to ``max_block_s``, then raises ``BufferFull``;
- an unreachable bus raises ``BusUnavailable`` at start, and during a run the buffer keeps
  the events and retries until the bus is back;
- ``close`` flushes; events still unsent when its timeout ends are written to a spill file
  (JSON lines, replayable with ``flywheel record FILE``) and ``RecorderError`` says where.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import os
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import orjson
from pydantic import ValidationError

from flywheel_loop.schemas import (
    Event,
    FeedbackGiven,
    InteractionRecorded,
    InvalidEvent,
    OutcomeObserved,
    Payload,
    describe_validation_error,
    new_event,
    parse_event,
)
from flywheel_loop.sdk.client import (
    BusUnavailable,
    EventPublisher,
    NatsOptions,
    PublishFailed,
    embedded_url,
    options_from_env,
)

__all__ = [
    "BufferFull", "BusUnavailable", "HasNatsOptions", "Recorder", "RecorderError", "SpillingRecorder", "SyncRecorder",
    "events_from_jsonl",
]


#: how long the first events after a pause wait for a batch to fill before they are sent
LINGER_S = 0.01


class RecorderError(RuntimeError):
    """Events could not be delivered; the message says where they were saved."""


class BufferFull(RecorderError):
    """The buffer stayed full for ``max_block_s``: the bus is slower than the agent, or down."""


def _payload(cls: type[Payload], fields: dict[str, Any]) -> Payload:
    try:
        return cls(**fields)
    except ValidationError as exc:
        raise InvalidEvent(f"{cls.event_type}: {describe_validation_error(exc)}") from None


class HasNatsOptions(Protocol):
    """Anything that knows where the bus is (the engine's ``Settings`` does)."""

    state_dir: Path

    def nats_options(self, url: str | None = None) -> NatsOptions: ...


def resolve_options(config: NatsOptions | HasNatsOptions | None, url: str | None) -> tuple[NatsOptions | None, Path]:
    """(options or None when no bus can be found, the spill folder) for a recorder or selector."""
    state_dir = Path(os.environ.get("FLYWHEEL_STATE_DIR", ".flywheel"))
    if isinstance(config, NatsOptions):
        options: NatsOptions | None = dataclasses.replace(config, url=url) if url else config
    elif config is not None:
        state_dir = config.state_dir
        options = config.nats_options(url or embedded_url(config.state_dir))
        if not options.url:
            options = None
    else:
        try:
            options = options_from_env()
        except BusUnavailable:
            options = None
        if options is not None and url:
            options = dataclasses.replace(options, url=url)
        elif options is None and url:
            options = NatsOptions(url=url)
    return options, state_dir / "spill"


class Recorder:
    """Asyncio recorder. Use ``async with Recorder(...) as rec:``.

    ``config`` says where the bus is: ``NatsOptions``, the engine's ``Settings``, or None for
    ``FLYWHEEL_NATS__URL`` / the embedded server of an engine running on ``FLYWHEEL_STATE_DIR``."""

    def __init__(
        self,
        config: NatsOptions | HasNatsOptions | None = None,
        *,
        url: str | None = None,
        source: str = "sdk",
        capacity: int = 10_000,
        max_block_s: float = 2.0,
        batch: int = 512,
        in_flight: int = 4,
        spill_dir: Path | None = None,
    ) -> None:
        if batch < 1 or in_flight < 1:
            raise ValueError(f"batch ({batch}) and in_flight ({in_flight}) must be at least 1")
        self.options, default_spill = resolve_options(config, url)
        self.url = self.options.url if self.options else None
        self.source = source
        self.capacity = capacity
        self.max_block_s = max_block_s
        self.batch = batch
        #: how many batches may wait for their acks at once
        self.in_flight = in_flight
        self.spill_dir = spill_dir or default_spill
        self._buf: collections.deque[Event[Any]] = collections.deque()
        self._in_flight = 0
        self._bus: EventPublisher | None = None
        self._pump_task: asyncio.Task[None] | None = None
        self._wakeup: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        #: the publisher waits for an event with no timer: the next enqueue must wake it
        self._idle = False
        self.last_error: BaseException | None = None
        self.published = 0

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> Recorder:
        if self.options is None:
            raise BusUnavailable(
                "no NATS URL configured and no engine running: start `flywheel up`, "
                "or set nats.url (FLYWHEEL_NATS__URL)"
            )
        self._bus = await EventPublisher.connect_to(self.options)
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._pump_task = asyncio.create_task(self._pump(), name="flywheel-recorder")
        return self

    async def __aenter__(self) -> Recorder:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until every recorded event is acknowledged by JetStream."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._buf or self._in_flight:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{self.pending} events not yet acknowledged")
            self._wake()
            await asyncio.sleep(0.005)

    async def close(self, timeout: float = 10.0) -> None:
        """Flush, stop, disconnect. Unsent events go to a spill file and raise."""
        try:
            await self.flush(timeout)
        except TimeoutError:
            pass
        self._closing = True
        self._wake()
        if self._pump_task is not None:
            try:
                await asyncio.wait_for(self._pump_task, 2.0)
            except (TimeoutError, asyncio.CancelledError):
                pass
        if self._bus is not None:
            await self._bus.close()
        if self._buf:
            path = self._spill()
            raise RecorderError(
                f"{len(path.read_bytes().splitlines())} events could not be published "
                f"({self.last_error!r}); saved to {path} — publish them later with `flywheel record {path}`"
            )

    def _spill(self) -> Path:
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        path = self.spill_dir / f"unsent-{int(time.time() * 1000)}.jsonl"
        with path.open("ab") as f:
            while self._buf:
                f.write(self._buf.popleft().to_bytes() + b"\n")
        return path

    @property
    def pending(self) -> int:
        return len(self._buf) + self._in_flight

    # ---------------------------------------------------------------- recording

    async def record_interaction(self, **fields: Any) -> str:
        """Record one interaction (fields of ``InteractionRecorded``); returns its id."""
        return await self.record(_payload(InteractionRecorded, fields))

    async def record_feedback(self, interaction_id: str, **fields: Any) -> str:
        """Record feedback on an interaction (fields of ``FeedbackGiven``)."""
        data = _payload(FeedbackGiven, {"interaction_id": interaction_id, **fields})
        return await self.record(data, correlation_id=interaction_id)

    async def record_outcome(self, interaction_id: str, **fields: Any) -> str:
        """Record what happened to an interaction's answer (fields of ``OutcomeObserved``)."""
        data = _payload(OutcomeObserved, {"interaction_id": interaction_id, **fields})
        return await self.record(data, correlation_id=interaction_id)

    async def record(self, data: Payload, correlation_id: str | None = None) -> str:
        event = new_event(data, source=self.source, correlation_id=correlation_id)
        if self.pending >= self.capacity:
            deadline = time.monotonic() + self.max_block_s
            while self.pending >= self.capacity:
                if time.monotonic() > deadline:
                    raise BufferFull(
                        f"{len(self._buf)} events waiting for {self.max_block_s}s; last error: {self.last_error!r}"
                    )
                self._wake()
                await asyncio.sleep(0.001)
        self.enqueue(event)
        return event.id

    def enqueue(self, event: Event[Any]) -> None:
        """Add a validated event to the buffer (thread-safe)."""
        if self._closing or self._loop is None:
            raise RecorderError("the recorder is not running")
        self._buf.append(event)
        if self._idle or len(self._buf) >= self.batch:
            self._wake()

    def _wake(self) -> None:
        if self._wakeup is None or self._loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._wakeup.set()
        else:
            self._loop.call_soon_threadsafe(self._wakeup.set)

    async def _pump(self) -> None:
        assert self._bus is not None and self._wakeup is not None
        delay = 0.05
        while not self._closing:
            if not self._buf:
                await self._idle_wait()
                continue
            failure = await self._publish_round(self._bus)
            if failure is not None:
                self.last_error = failure
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            delay = 0.05
            await asyncio.sleep(0)

    async def _idle_wait(self) -> None:
        """Wait for the next event (or ``close``) with no timer, so an idle recorder costs nothing (it polled every
        10 ms: 2.5 % of a core); then give a partial batch ``LINGER_S`` to fill, as the poll did. ``enqueue`` wakes
        the publisher while ``_idle`` is set: set before the buffer is looked at, so an event appended after the
        look finds it set, and one appended before is seen."""
        assert self._wakeup is not None
        self._idle = True
        self._wakeup.clear()
        try:
            if not self._buf and not self._closing:
                await self._wakeup.wait()
        finally:
            self._idle = False
        if 0 < len(self._buf) < self.batch and not self._closing:
            await self._sleep(LINGER_S)

    async def _sleep(self, seconds: float) -> None:
        """Wait ``seconds``, or less when the publisher is woken."""
        assert self._wakeup is not None
        self._wakeup.clear()
        try:
            await asyncio.wait_for(self._wakeup.wait(), seconds)
        except TimeoutError:
            pass

    async def _publish_round(self, bus: EventPublisher) -> BaseException | None:
        """Publish up to ``in_flight`` batches from the buffer at once (pipelined: each batch's acks are
        awaited together, not one batch after the other). A batch that fails goes back to the front of
        the buffer, in order; its ids make the retry safe. Returns the first failure, or None."""
        batches: list[list[Event[Any]]] = []
        while self._buf and len(batches) < self.in_flight:
            batches.append([self._buf.popleft() for _ in range(min(self.batch, len(self._buf)))])
        self._in_flight = sum(len(b) for b in batches)
        results: list[Any]
        try:
            results = await asyncio.gather(*(bus.publish_many(b) for b in batches), return_exceptions=True)
        except asyncio.CancelledError:
            results = [asyncio.CancelledError()] * len(batches)
        failure: BaseException | None = None
        failed: list[Event[Any]] = []
        for batch, result in zip(batches, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, (PublishFailed, BusUnavailable, OSError, asyncio.CancelledError)):
                    raise result
                failure = failure or result
                failed.extend(batch)
            else:
                self.published += len(batch)
        self._buf.extendleft(reversed(failed))  # keep their order, ahead of what came since
        self._in_flight = 0
        return failure


class SpillingRecorder(Recorder):
    """A recorder for a server that must never fail or wait because of the bus (the gateway).

    ``record`` and ``enqueue`` never block and never raise for the bus: the bus may be down at start (the
    recorder connects in the background and keeps trying) or go down during the run. Events wait in memory up to
    ``capacity``; past that, or once the oldest has waited ``spill_after_s`` without an ack, they are appended to
    spill files (JSON lines) under ``spill_dir``. When publishing works again the spill files are published in
    order, batch by batch, each file rewritten without what was acked, and deleted when empty. Ids are given at
    record time and are the ``Nats-Msg-Id``, so an event published twice (an ack lost in an outage, then
    republished from the spill) is stored once by JetStream's duplicate window (``streams.duplicate_window_s``).
    """

    def __init__(
        self, config: NatsOptions | HasNatsOptions | None = None, *, spill_after_s: float = 2.0, **options: Any
    ) -> None:
        super().__init__(config, **options)
        self.spill_after_s = spill_after_s
        self.spilled = 0
        self._down_since: float | None = None
        self._spill_seq = 0
        self._has_spill = True  # files left by an earlier run are published first
        self._log = logging.getLogger("flywheel_loop.sdk.recorder")

    async def start(self) -> SpillingRecorder:
        """Start the background publisher; returns at once, connected or not."""
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._pump_task = asyncio.create_task(self._run(), name="flywheel-spilling-recorder")
        return self

    async def __aenter__(self) -> SpillingRecorder:
        return await self.start()

    async def record(self, data: Payload, correlation_id: str | None = None) -> str:
        event = new_event(data, source=self.source, correlation_id=correlation_id)
        self.enqueue(event)
        return event.id

    def enqueue(self, event: Event[Any]) -> None:
        """Add an event; never blocks. Over ``capacity`` the buffer goes to a spill file."""
        if self._loop is None:
            raise RecorderError("the recorder is not running")
        self._buf.append(event)
        if len(self._buf) >= self.capacity:
            self._spill_buffer()
        elif self._idle or len(self._buf) >= self.batch:
            self._wake()

    @property
    def connected(self) -> bool:
        return self._bus is not None and self._bus.nc.is_connected

    def spill_files(self) -> list[Path]:
        """Spill files waiting to be published, oldest first."""
        if not self.spill_dir.is_dir():
            return []
        return sorted(self.spill_dir.glob("spill-*.jsonl"))

    @property
    def pending(self) -> int:
        return len(self._buf) + self._in_flight

    def _spill_buffer(self) -> None:
        if not self._buf:
            return
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        self._spill_seq += 1
        # time first, so the files sort in the order their events were recorded
        path = self.spill_dir / f"spill-{time.time_ns():020d}-{os.getpid()}-{self._spill_seq}.jsonl"
        n = 0
        with path.open("ab") as f:
            while self._buf:
                f.write(self._buf.popleft().to_bytes() + b"\n")
                n += 1
        self.spilled += n
        self._has_spill = True
        self._log.warning("bus unavailable (%r): %d records spilled to %s", self.last_error, n, path)

    async def _connect(self) -> bool:
        if self._bus is not None:
            return True
        if self.options is None:
            self.last_error = BusUnavailable("no NATS URL configured and no engine running")
            return False
        try:
            self._bus = await EventPublisher.connect_to(self.options)
        except BusUnavailable as exc:
            self.last_error = exc
            return False
        return True

    async def _run(self) -> None:
        assert self._wakeup is not None
        delay = 0.05
        while not self._closing:
            if not await self._connect() or not self.connected:
                self._note_down()
                await self._sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            if self._has_spill and not await self._publish_spilled():
                self._note_down()
                await self._sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            if not self._buf:
                self._down_since = None
                await self._idle_wait()
                continue
            assert self._bus is not None
            failure = await self._publish_round(self._bus)
            if failure is not None:
                self.last_error = failure
                self._note_down()
                await self._sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            self._down_since = None
            delay = 0.05

    def _note_down(self) -> None:
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
        elif now - self._down_since >= self.spill_after_s and self._buf:
            self._spill_buffer()

    async def _publish_spilled(self) -> bool:
        """Publish the spill files in order; False when the bus failed again (what is left stays on disk)."""
        assert self._bus is not None
        for path in self.spill_files():
            try:
                events = [parse_event(line) for line in path.read_bytes().splitlines() if line.strip()]
            except (OSError, InvalidEvent) as exc:
                self._log.error("spill file %s cannot be read back (%s); left in place", path, exc)
                path.rename(path.with_suffix(".unreadable"))
                continue
            while events:
                batch, rest = events[: self.batch], events[self.batch :]
                try:
                    await self._bus.publish_many(batch)
                except (PublishFailed, BusUnavailable, OSError) as exc:
                    self.last_error = exc
                    return False
                self.published += len(batch)
                events = rest
                _rewrite(path, events)
            path.unlink(missing_ok=True)
        self._has_spill = False
        return True

    async def close(self, timeout: float = 10.0) -> None:
        """Flush for up to ``timeout``; what is still unsent goes to a spill file (published by the next start)."""
        try:
            await self.flush(timeout)
        except TimeoutError:
            pass
        self._closing = True
        self._wake()
        if self._pump_task is not None:
            try:
                await asyncio.wait_for(self._pump_task, 2.0)
            except (TimeoutError, asyncio.CancelledError):
                self._pump_task.cancel()
        self._spill_buffer()
        if self._bus is not None:
            await self._bus.close()
            self._bus = None

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until the buffer and the spill files are published (raises ``TimeoutError`` after ``timeout``)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._buf or self._in_flight or (self._has_spill and self.spill_files()):
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{self.pending} events and {len(self.spill_files())} spill files not yet published")
            self._wake()
            await asyncio.sleep(0.01)


def _rewrite(path: Path, events: list[Event[Any]]) -> None:
    """Replace a spill file by what is left of it (atomically, so a crash leaves one or the other)."""
    if not events:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(b"".join(e.to_bytes() + b"\n" for e in events))
    os.replace(tmp, path)


class SyncRecorder:
    """A recorder for synchronous agents: the bus runs on a background thread.

    Each call validates on the calling thread and returns the event id at once.
    """

    def __init__(self, config: NatsOptions | HasNatsOptions | None = None, **options: Any) -> None:
        self._recorder = Recorder(config, **options)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="flywheel-recorder", daemon=True)

    def start(self) -> SyncRecorder:
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._recorder.start(), self._loop).result()
        except BaseException:
            self._stop_loop()
            raise
        return self

    def __enter__(self) -> SyncRecorder:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def record_interaction(self, **fields: Any) -> str:
        return self.record(_payload(InteractionRecorded, fields))

    def record_feedback(self, interaction_id: str, **fields: Any) -> str:
        data = _payload(FeedbackGiven, {"interaction_id": interaction_id, **fields})
        return self.record(data, correlation_id=interaction_id)

    def record_outcome(self, interaction_id: str, **fields: Any) -> str:
        data = _payload(OutcomeObserved, {"interaction_id": interaction_id, **fields})
        return self.record(data, correlation_id=interaction_id)

    def record(self, data: Payload, correlation_id: str | None = None) -> str:
        rec = self._recorder
        event = new_event(data, source=rec.source, correlation_id=correlation_id)
        deadline = time.monotonic() + rec.max_block_s
        while rec.pending >= rec.capacity:
            if time.monotonic() > deadline:
                raise BufferFull(f"{len(rec._buf)} events waiting; last error: {rec.last_error!r}")
            time.sleep(0.001)
        rec.enqueue(event)
        return event.id

    def flush(self, timeout: float | None = None) -> None:
        asyncio.run_coroutine_threadsafe(self._recorder.flush(timeout), self._loop).result()

    def close(self, timeout: float = 10.0) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self._recorder.close(timeout), self._loop).result()
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    @property
    def pending(self) -> int:
        return self._recorder.pending

    @property
    def last_error(self) -> BaseException | None:
        return self._recorder.last_error


def events_from_jsonl(data: bytes) -> list[dict[str, Any]]:
    """Parse a JSON document or JSON lines into raw event dicts."""
    stripped = data.strip()
    if not stripped:
        return []
    try:
        doc = orjson.loads(stripped)
        return doc if isinstance(doc, list) else [doc]
    except orjson.JSONDecodeError:
        return [orjson.loads(line) for line in stripped.splitlines() if line.strip()]
