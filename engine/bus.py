"""The bus: a NATS connection, the two JetStream streams, and the one way to publish.

- ``FLYWHEEL_RAW`` holds what agents publish (``fw.raw.>``) for a short time
  (``streams.raw_max_age_days``, 30 by default, and ``raw_max_bytes``); single messages may be
  deleted (``flywheel forget`` erases a data subject's intake).
- ``FLYWHEEL_LOG`` holds everything derived (``fw.log.>``): file storage, no delete, no
  purge, kept forever unless ``log_max_age_days`` / ``log_max_bytes`` say otherwise, a
  duplicate window so a message published twice under one ``Nats-Msg-Id`` is stored once.

Publishing waits for JetStream's ack and retries through a reconnect with the same id, so
an event is stored exactly once or the caller gets ``PublishFailed``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import ssl
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    PubAck,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from engine import telemetry
from engine.config import NatsConfig, Settings, StreamsConfig
from schemas import Event

log = logging.getLogger(__name__)

DAY_S = 86_400.0
_RETRYABLE = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.js.errors.NoStreamResponseError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
    asyncio.TimeoutError,
)


class BusUnavailable(ConnectionError):
    """NATS could not be reached."""


class PublishFailed(RuntimeError):
    """An event was not acknowledged by JetStream within the retry budget."""


@dataclass(frozen=True)
class StreamNames:
    raw: str
    log: str

    @classmethod
    def from_config(cls, cfg: StreamsConfig) -> StreamNames:
        return cls(raw=f"{cfg.prefix}_RAW", log=f"{cfg.prefix}_LOG")

    def for_stream(self, stream: str) -> str:
        return self.raw if stream == "raw" else self.log


def stream_configs(cfg: StreamsConfig) -> list[StreamConfig]:
    """The two streams as configured: retention (``*_max_age_days``, ``*_max_bytes``; 0 = no
    limit) per stream. The raw stream allows deleting single messages (``flywheel forget``
    erases a data subject's intake); the log allows neither delete nor purge."""
    names = StreamNames.from_config(cfg)
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
            **common,
        ),
    ]


def _tls_context(cfg: NatsConfig) -> ssl.SSLContext | None:
    if not (cfg.tls_ca or cfg.tls_cert):
        return None
    ctx = ssl.create_default_context(cafile=str(cfg.tls_ca) if cfg.tls_ca else None)
    if cfg.tls_cert:
        ctx.load_cert_chain(str(cfg.tls_cert), str(cfg.tls_key) if cfg.tls_key else None)
    return ctx


class Bus:
    """A connected client with JetStream, the stream names and publish helpers."""

    def __init__(self, nc: Client, settings: Settings, url: str = "", errors: list[str] | None = None) -> None:
        self.nc = nc
        self.url = url
        #: Errors the server reported asynchronously (e.g. permission violations), newest last.
        self.server_errors = errors if errors is not None else []
        self.js: JetStreamContext = nc.jetstream(timeout=settings.nats.publish_timeout_s)
        self.settings = settings
        self.streams = StreamNames.from_config(settings.streams)

    @classmethod
    async def connect(cls, settings: Settings, url: str) -> Bus:
        cfg = settings.nats
        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            # The server reports a refused publish asynchronously; keep it so the publish that
            # is left without an ack can say why.
            log.debug("nats: %s", exc)
            errors.append(str(exc))
            del errors[:-20]

        opts: dict[str, Any] = dict(
            servers=[u.strip() for u in url.split(",")],
            connect_timeout=cfg.connect_timeout_s,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.25,
            error_cb=on_error,
            name="flywheel",
        )
        if cfg.user:
            opts.update(user=cfg.user, password=cfg.password)
        if cfg.token:
            opts["token"] = cfg.token
        if cfg.creds_file:
            opts["user_credentials"] = str(cfg.creds_file)
        tls = _tls_context(cfg)
        if tls is not None:
            opts["tls"] = tls
        try:
            # Reconnects are unbounded once connected, so bound the first connect here.
            nc = await asyncio.wait_for(nats.connect(**opts), cfg.connect_timeout_s)
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            reason = str(exc) or f"no answer within {cfg.connect_timeout_s:g}s"
            raise BusUnavailable(f"cannot reach NATS at {url}: {reason}") from None
        return cls(nc, settings, url, errors)

    async def ensure_streams(self, wait_s: float = 30.0) -> None:
        """Create the streams, or bring an existing one up to the configured settings.

        A cluster that is still electing its JetStream leader does not answer yet: retry for
        up to ``wait_s`` seconds before giving up."""
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

    async def close(self) -> None:
        if not self.nc.is_closed:
            try:
                await self.nc.flush(timeout=2)
            except (TimeoutError, nats.errors.Error, OSError):
                pass  # closing anyway; unacked work is redelivered
            try:
                await self.nc.close()
            except OSError:
                pass  # the server is already gone

    # ------------------------------------------------------------------ publish

    def _headers(self, event: Event[Any], trace: dict[str, str] | None = None) -> dict[str, str]:
        headers = {"Nats-Msg-Id": event.id}
        if trace:
            headers.update(trace)
        else:
            telemetry.inject(headers)
        return headers

    async def publish(self, event: Event[Any]) -> PubAck:
        """Publish one event and wait for its ack, retrying through reconnects."""
        return await self.publish_raw(event.subject, event.to_bytes(), self._headers(event))

    async def publish_raw(self, subject: str, payload: bytes, headers: dict[str, str]) -> PubAck:
        budget = self.settings.nats.publish_retry_s
        deadline = asyncio.get_running_loop().time() + budget
        delay = 0.05
        while True:
            try:
                ack = await self.js.publish(subject, payload, headers=dict(headers))
                return ack
            except _RETRYABLE as exc:
                refused = self._refusal(subject)
                if refused:
                    raise PublishFailed(f"NATS refused {subject}: {refused}") from exc
                if asyncio.get_running_loop().time() + delay > deadline:
                    hint = ""
                    if isinstance(exc, (nats.errors.NoRespondersError, nats.js.errors.NoStreamResponseError)):
                        hint = " (no stream takes this subject: has the engine created its streams?)"
                    raise PublishFailed(f"no ack for {subject} after {budget:.0f}s: {exc!r}{hint}") from exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
            except nats.js.errors.APIError as exc:
                raise PublishFailed(f"JetStream refused {subject}: {exc}") from exc
            except nats.errors.ConnectionClosedError as exc:
                raise PublishFailed(f"connection closed while publishing {subject}") from exc

    async def publish_many(
        self,
        events: Sequence[Event[Any]] | Iterable[Event[Any]],
        trace: dict[str, dict[str, str]] | None = None,
    ) -> list[PubAck]:
        """Publish a batch with pipelined acks; anything not acked is retried one by one.

        ``trace`` maps an event id to the trace-context headers it should carry (a worker
        publishes a batch after the spans that produced each event have ended)."""
        trace = trace or {}
        events = list(events)
        if not events:
            return []
        if len(events) == 1:
            e = events[0]
            return [await self.publish_raw(e.subject, e.to_bytes(), self._headers(e, trace.get(e.id)))]
        timeout = self.settings.nats.publish_timeout_s
        futures: list[asyncio.Future[PubAck] | None] = []
        for event in events:
            try:
                # wait_stall=None: no per-message timer; the batch has one timeout below.
                fut = await self.js.publish_async(
                    event.subject, event.to_bytes(), headers=self._headers(event, trace.get(event.id))
                )
            except (TimeoutError, nats.errors.Error, OSError):
                fut = None
            futures.append(fut)
        pending = {f for f in futures if f is not None}
        if pending:
            await asyncio.wait(pending, timeout=timeout)
        acks: list[PubAck] = []
        for event, fut in zip(events, futures, strict=True):
            ack = None
            if fut is not None and fut.done() and not fut.cancelled() and fut.exception() is None:
                ack = fut.result()
            elif fut is not None and not fut.done():
                fut.cancel()
            if ack is None:
                # Not acked: publish again under the same id, so it is stored at most once.
                ack = await self.publish_raw(event.subject, event.to_bytes(), self._headers(event, trace.get(event.id)))
            acks.append(ack)
        return acks

    def _refusal(self, subject: str) -> str | None:
        """A permissions violation the server reported for ``subject``, if any."""
        for err in reversed(self.server_errors):
            if "permissions violation" in err.lower() and subject.lower() in err.lower():
                return err.removeprefix("nats: ")
        return None

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
        if len(subjects) == 1:  # one filter works on servers older than 2.10 too
            config.filter_subject = subjects[0]
        else:
            config.filter_subjects = list(subjects)
        sub = await self.js.pull_subscribe(
            subjects[0], stream=self.streams.for_stream(stream), config=config, pending_msgs_limit=4000
        )
        try:
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
                    yield seq, msg.data
                    if seq == end:
                        return
        finally:
            try:
                await sub.unsubscribe()
            except nats.errors.Error:
                pass  # the server drops the inactive consumer anyway
