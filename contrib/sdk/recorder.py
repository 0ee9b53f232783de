"""The agent SDK: record interactions, feedback and outcomes without slowing the agent.

``Recorder`` (asyncio) and ``SyncRecorder`` (any thread) validate each event on the
caller's side (a bad field raises at once, naming it), put it in a bounded buffer and
return its id; a background task publishes the buffer in pipelined batches with acks and
dedupe ids. Nothing is dropped silently:

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
    "BufferFull", "BusUnavailable", "HasNatsOptions", "Recorder", "RecorderError", "SyncRecorder", "events_from_jsonl",
]


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
        spill_dir: Path | None = None,
    ) -> None:
        self.options, default_spill = resolve_options(config, url)
        self.url = self.options.url if self.options else None
        self.source = source
        self.capacity = capacity
        self.max_block_s = max_block_s
        self.batch = batch
        self.spill_dir = spill_dir or default_spill
        self._buf: collections.deque[Event[Any]] = collections.deque()
        self._in_flight = 0
        self._bus: EventPublisher | None = None
        self._pump_task: asyncio.Task[None] | None = None
        self._wakeup: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
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
        if len(self._buf) >= self.batch:
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
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), 0.01)
                except TimeoutError:
                    pass
                continue
            batch = [self._buf.popleft() for _ in range(min(self.batch, len(self._buf)))]
            self._in_flight = len(batch)
            try:
                await self._bus.publish_many(batch)
            except (PublishFailed, BusUnavailable, OSError, asyncio.CancelledError) as exc:
                self.last_error = exc
                self._buf.extendleft(reversed(batch))  # keep order; ids make the retry safe
                self._in_flight = 0
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            self.published += len(batch)
            self._in_flight = 0
            delay = 0.05
            await asyncio.sleep(0)


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
