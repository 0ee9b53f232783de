"""The bus: a NATS connection, the two JetStream streams, and the one way to publish.

- ``FLYWHEEL_RAW`` holds what agents publish (``fw.raw.>``) for a short time
  (``streams.raw_max_age_days``, 30 by default, and ``raw_max_bytes``); single messages may be
  deleted (``flywheel forget`` erases a data subject's intake).
- ``FLYWHEEL_LOG`` holds everything derived (``fw.log.>``): file storage, no delete, no
  purge, kept forever unless ``log_max_age_days`` / ``log_max_bytes`` say otherwise, a
  duplicate window so a message published twice under one ``Nats-Msg-Id`` is stored once.
- ``<prefix>_KEYS`` (a KV bucket, or a folder: ``[keys]``) holds the data keys that seal
  personal text on the log (``engine/sealing.py``).

Artifacts (datasets, adapters, checkpoints, base models) live in the object store beside the
streams: ``bus.artifacts`` (``engine/artifacts.py``).

Publishing waits for JetStream's ack and retries through a reconnect with the same id, so
an event is stored exactly once or the caller gets ``PublishFailed``. Every event the bus
publishes is sealed (its personal text encrypted under its data subject's key) and every
event it reads for the engine is opened again (``read_log``, ``open_many``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from datetime import datetime
from typing import Any

import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from flywheel_loop.engine import telemetry
from flywheel_loop.engine.artifacts import ArtifactStore
from flywheel_loop.engine.config import Settings, StreamsConfig
from flywheel_loop.engine.keys import KeyStoreUnavailable, key_store
from flywheel_loop.engine.sealing import KeyRing, Opened
from flywheel_loop.schemas import Event, subject_for
from flywheel_loop.sdk.client import BusUnavailable, EventPublisher, PublishFailed, StreamNames

log = logging.getLogger(__name__)

DAY_S = 86_400.0

__all__ = ["Bus", "BusUnavailable", "PublishFailed", "StreamNames", "fetch_batch", "stream_configs"]

#: status codes that end a pull request: no messages (404), expired (408), conflict (409: e.g. the
#: consumer was deleted or its limits changed); 100 is an idle heartbeat
_PULL_ENDED = {"404", "408", "409"}
_HEARTBEAT = "100"
#: how long past its timeout a call waits for the status that ends its open request: a status
#: left unread would be taken by the next call as the end of *its* request (an early, empty return)
_STATUS_GRACE_S = 1.0


async def fetch_batch(sub: Any, batch: int, timeout: float) -> list[Msg]:
    """Up to ``batch`` messages of the pull subscription ``sub``, as its ``fetch(batch, timeout)`` gives them,
    without nats-py's timer and task per message: once a message came, whatever else has arrived is taken
    from the subscription's queue at once. Every request it makes is over when it returns, so no message is
    delivered to it afterwards to wait unprocessed while its ack wait runs: one request for what is there
    now (``no_wait``: those messages, then a 404); when that is nothing, one for a single message that waits
    up to ``timeout``, and once it came, another ``no_wait`` one for the rest. A request that the server
    ends with a status (no messages, expired) is read to that status, up to ``_STATUS_GRACE_S`` past the
    timeout, so that a status of this call is not left for the next one to mistake for the end of its own
    request (a server slower than that still can: the next call then returns early, empty, and loses nothing).
    ``nats.errors.TimeoutError`` when nothing came within ``timeout``; an error status from the server
    raises as ``fetch`` raises it."""
    inner = sub._sub
    queue: asyncio.Queue[Msg] = inner._pending_queue
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    msgs: list[Msg] = []
    open_request = False

    def take(msg: Msg) -> None:
        """Keep a message, or note the end of the open request (a status)."""
        nonlocal open_request
        status = (msg.headers or {}).get("Status") if msg.headers else None
        if not status:
            msgs.append(msg)
        elif status in _PULL_ENDED:
            open_request = False
        elif status != _HEARTBEAT:
            raise nats.js.errors.APIError.from_msg(msg)

    def drain(limit: int) -> None:
        while len(msgs) < limit and not queue.empty():
            msg = queue.get_nowait()
            inner._pending_size -= len(msg.data)
            queue.task_done()
            take(msg)

    async def request(n: int, wait: bool) -> None:
        """Ask for ``n`` more messages (``wait``: for up to what is left of the timeout) and take them
        until the request is over: ``n`` came, or its status ended it, or the time is up."""
        nonlocal open_request
        body: dict[str, Any] = {"batch": n}
        if wait:
            body["expires"] = max(int((deadline - loop.time()) * 1e9) - 100_000, 1_000_000)  # over there first
        else:
            body["no_wait"] = True
        await sub._nc.publish(sub._nms, orjson.dumps(body), sub._deliver)
        open_request = True
        limit = len(msgs) + n
        while open_request and len(msgs) < limit:
            if queue.empty():
                # the server ends the request by the timeout (``expires``) or at once (``no_wait``): wait
                # for that end a little past the timeout if need be
                left = deadline - loop.time() + _STATUS_GRACE_S
                try:
                    take(await inner.next_msg(timeout=max(left, 0.001)))
                except nats.errors.TimeoutError:
                    return
            drain(limit)

    drain(batch)  # what an earlier request left (its statuses are stale: they end no request of this call)
    if len(msgs) < batch:
        await request(batch - len(msgs), wait=False)
    if not msgs and deadline - loop.time() > 0.002:
        await request(1, wait=True)  # nothing now: wait for the first, then take what came with it
        if msgs and len(msgs) < batch:
            await request(batch - len(msgs), wait=False)
    if not msgs:
        raise nats.errors.TimeoutError
    return msgs


def stream_configs(cfg: StreamsConfig) -> list[StreamConfig]:
    """The two streams as configured: retention (``*_max_age_days``, ``*_max_bytes``; 0 = no
    limit) per stream. The raw stream allows deleting single messages (``flywheel forget``
    erases a data subject's intake); the log allows neither delete nor purge."""
    names = StreamNames.with_prefix(cfg.prefix)
    common: dict[str, Any] = dict(
        storage=StorageType.FILE,
        retention=RetentionPolicy.LIMITS,
        discard=DiscardPolicy.OLD,
        duplicate_window=cfg.duplicate_window_s,
        num_replicas=cfg.replicas,
    )
    return [
        StreamConfig(
            name=names.raw,
            description="raw intake from agents; short retention",
            subjects=["fw.raw.>"],
            max_age=cfg.raw_max_age_days * DAY_S,
            max_bytes=cfg.raw_max_bytes or -1,
            # `forget` deletes (and erases) single messages from the raw stream; the log never.
            deny_delete=False,
            deny_purge=False,
            **common,
        ),
        StreamConfig(
            name=names.log,
            description="the immutable event log",
            subjects=["fw.log.>"],
            max_age=cfg.log_max_age_days * DAY_S,
            max_bytes=cfg.log_max_bytes or -1,
            deny_delete=True,
            deny_purge=True,
            # the agent SDK's Selector asks for the last quality.assessed by a subject-named direct get,
            # so an agent's credential can allow that one subject (ops/nats/accounts.conf)
            allow_direct=True,
            **common,
        ),
    ]


class Bus(EventPublisher):
    """The engine's connection: the agent's publisher, plus the streams, scans and positions."""

    def __init__(self, nc: Client, settings: Settings, url: str = "", errors: list[str] | None = None) -> None:
        super().__init__(nc, settings.nats_options(url), errors)
        self.settings = settings
        #: the data keys: personal text is sealed on publishing and opened on reading
        self.keys = KeyRing(key_store(settings, self.js), settings.keys.cache_s)
        self._artifacts: ArtifactStore | None = None

    @property
    def artifacts(self) -> ArtifactStore:
        """The artifact store on this bus (``engine/artifacts.py``); its bucket is made on first use."""
        if self._artifacts is None:
            self._artifacts = ArtifactStore(self.js, self.settings, self.nc.max_payload or (1 << 20))
        return self._artifacts

    @classmethod
    async def connect(cls, settings: Settings, url: str) -> Bus:
        nc, errors = await cls.open_connection(settings.nats_options(url))
        return cls(nc, settings, url, errors)

    def inject_trace(self, headers: dict[str, str]) -> None:
        telemetry.inject(headers)

    async def ensure_streams(self, wait_s: float = 30.0) -> None:
        """Create the streams, or bring an existing one up to the configured settings.

        A cluster that is still electing its JetStream leader (or a stream's, after a node died) does
        not answer yet: retry for up to ``wait_s`` seconds before giving up; the key store's bucket too."""
        deadline = asyncio.get_running_loop().time() + wait_s
        for config in stream_configs(self.settings.streams):
            while True:
                try:
                    try:
                        await self.js.add_stream(config)
                    except nats.js.errors.BadRequestError:
                        await self._update_stream(config)
                    break
                except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError,
                        nats.js.errors.ServerError) as exc:
                    if asyncio.get_running_loop().time() > deadline:
                        raise BusUnavailable(f"JetStream did not accept stream {config.name}: {exc!r}") from exc
                    await asyncio.sleep(0.3)
        while True:  # the key bucket's stream too: its leader may still be moving after a node died
            try:
                await self.keys.store.ensure()
                return
            except KeyStoreUnavailable:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.3)

    async def encode_many(self, events: Sequence[Event[Any]]) -> list[bytes]:
        """Each event's wire bytes, its personal text sealed (``SubjectForgotten`` for a forgotten subject:
        the worker leaves those out beforehand with ``keys.writable``)."""
        return await self.keys.seal_many(events)

    async def open_many(self, raws: Sequence[bytes]) -> list[Opened]:
        """Parse and open messages: each an event (``forgotten`` set when its subject's key is destroyed)
        or the ``InvalidEvent`` saying why it is not one."""
        return await self.keys.open_many(raws)

    async def _update_stream(self, config: StreamConfig) -> None:
        """Bring an existing stream to ``config``. A raw stream made by an older version denies
        deletes, and JetStream never lifts that: keep it (``flywheel forget`` then says so)."""
        try:
            await self.js.update_stream(config)
        except nats.js.errors.APIError as exc:
            # "stream configuration update can not cancel deny message deletes" (a 500, err 10052)
            if "deny message deletes" not in (exc.description or "") or config.deny_delete:
                raise
            log.warning(
                "stream %s denies deleting messages (made by an older version) and JetStream cannot lift that;"
                " its retention is updated but `flywheel forget` cannot erase from it until it is recreated",
                config.name,
            )
            await self.js.update_stream(dataclasses.replace(config, deny_delete=True))

    async def read_log(self, types: Sequence[str], until: int | None = None) -> list[tuple[int, Event[Any]]]:
        """(sequence, event) of every event of ``types`` on the log up to ``until`` (None: the end
        now), in order, opened: a forgotten subject's events come with ``forgotten`` set. A message
        that does not validate is skipped (the worker that met it live rejected it)."""
        out: list[tuple[int, Event[Any]]] = []
        chunk: list[tuple[int, bytes]] = []

        async def flush() -> None:
            opened = await self.open_many([data for _, data in chunk])
            out.extend((seq, e) for (seq, _), e in zip(chunk, opened, strict=True) if isinstance(e, Event))
            chunk.clear()

        async for seq, data in self.scan("log", [subject_for(t) for t in types], until_seq=until):
            chunk.append((seq, data))
            if len(chunk) >= 1000:
                await flush()
        await flush()
        return out

    async def stored_ids(self, events: Sequence[Event[Any]], since: datetime) -> set[str]:
        """The ids of ``events`` already stored in their streams, looking at messages stored at or after
        ``since`` (headers only). The worker asks this for the outputs of a redelivered input, with
        ``since`` the input's own store time (outputs are always stored after their input), so a
        redelivery after the duplicate window still publishes nothing twice."""
        found: set[str] = set()
        by_stream: dict[str, list[Event[Any]]] = {}
        for event in events:
            by_stream.setdefault(type(event.data).stream, []).append(event)
        for stream, mine in by_stream.items():
            wanted = {e.id for e in mine}
            end = await self.last_sequence(stream)
            if end == 0:
                continue
            config = ConsumerConfig(
                ack_policy=AckPolicy.NONE,
                deliver_policy=DeliverPolicy.BY_START_TIME,
                opt_start_time=since,
                headers_only=True,
                inactive_threshold=60.0,
                mem_storage=True,
            )
            messages = self._consume(stream, sorted({e.subject for e in mine}), config, end)
            async with contextlib.aclosing(messages):
                async for msg in messages:
                    msg_id = (msg.headers or {}).get("Nats-Msg-Id")
                    if msg_id in wanted:
                        found.add(msg_id)
                        if wanted <= found:
                            break
        return found

    async def last_sequence(self, stream: str = "log") -> int:
        info = await self.js.stream_info(self.streams.for_stream(stream))
        return int(info.state.last_seq)

    async def scan(
        self, stream: str, subjects: Sequence[str], after_seq: int = 0, until_seq: int | None = None
    ) -> AsyncIterator[tuple[int, bytes]]:
        """(sequence, data) of every message of ``subjects`` on ``stream`` ("raw" or "log") after
        ``after_seq`` and up to ``until_seq`` (or the last message when the scan starts), in order,
        through an ephemeral consumer that acks nothing."""
        end = await self.last_sequence(stream)
        if until_seq is not None:
            end = min(end, until_seq)
        if end <= after_seq:
            return
        config = ConsumerConfig(
            ack_policy=AckPolicy.NONE,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=after_seq + 1,
            inactive_threshold=60.0,
            mem_storage=True,
        )
        async for msg in self._consume(stream, subjects, config, end):
            yield int(msg.metadata.sequence.stream), msg.data

    async def _consume(
        self, stream: str, subjects: Sequence[str], config: ConsumerConfig, end: int
    ) -> AsyncGenerator[Msg, None]:
        """The messages an ack-less ephemeral consumer with ``config`` delivers on ``subjects``, up to
        stream sequence ``end``."""
        if len(subjects) == 1:  # one filter works on servers older than 2.10 too
            config.filter_subject = subjects[0]
        else:
            config.filter_subjects = list(subjects)
        sub = await self.js.pull_subscribe(
            subjects[0], stream=self.streams.for_stream(stream), config=config, pending_msgs_limit=4000
        )
        try:
            if int((await sub.consumer_info()).num_pending or 0) == 0:
                return  # nothing matches: no need to wait for a fetch to time out
            while True:
                try:
                    msgs = await sub.fetch(1000, timeout=1.0)
                except (TimeoutError, nats.errors.TimeoutError):  # either, by nats-py version and path
                    info = await sub.consumer_info()
                    if int(info.num_pending or 0) == 0:
                        return
                    continue
                for msg in msgs:
                    seq = int(msg.metadata.sequence.stream)
                    if seq > end:
                        return
                    yield msg
                    if seq == end:
                        return
        finally:
            try:
                await sub.unsubscribe()
            except nats.errors.Error:
                pass  # the server drops the inactive consumer anyway
