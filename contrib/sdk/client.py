"""The agent's side of the bus: connect to NATS and publish events exactly once.

An event is stored once or the caller hears about it: ``publish`` waits for JetStream's ack and
retries through a reconnect under the same ``Nats-Msg-Id`` (the event id), so a retried
publish is dropped by the stream's duplicate window; ``publish_many`` pipelines a batch and
retries one by one whatever was not acknowledged. The engine's ``Bus`` builds on this class
(adding the streams, scans and positions); an agent needs nothing more than this module.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import PubAck

from flywheel_loop.schemas import Event

__all__ = [
    "BusUnavailable",
    "EventPublisher",
    "NatsOptions",
    "PublishFailed",
    "StreamNames",
    "options_from_env",
]

log = logging.getLogger(__name__)

_RETRYABLE = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.js.errors.NoStreamResponseError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
    asyncio.TimeoutError,
)

#: how many events a batch encodes or sends before it lets other tasks run (the agent's calls wait meanwhile)
_SLICE = 64

#: A header carrying trace context (``traceparent``), by event id.
TraceHeaders = dict[str, dict[str, str]]


class BusUnavailable(ConnectionError):
    """NATS could not be reached."""


class PublishFailed(RuntimeError):
    """An event was not acknowledged by JetStream within the retry budget."""


@dataclass(frozen=True)
class StreamNames:
    """The two streams: the raw intake and the immutable log."""

    raw: str
    log: str

    @classmethod
    def with_prefix(cls, prefix: str) -> StreamNames:
        return cls(raw=f"{prefix}_RAW", log=f"{prefix}_LOG")

    def for_stream(self, stream: str) -> str:
        return self.raw if stream == "raw" else self.log


@dataclass(frozen=True)
class NatsOptions:
    """Where the bus is and how to authenticate: all an agent needs to know."""

    url: str
    user: str | None = None
    password: str | None = None
    token: str | None = None
    creds_file: Path | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    connect_timeout_s: float = 5.0
    publish_timeout_s: float = 5.0
    publish_retry_s: float = 60.0
    stream_prefix: str = "FLYWHEEL"
    name: str = "flywheel"
    #: where replies (acks, API answers, pushed messages) come back; None: ``_INBOX_<user>`` with a user
    #: name, else ``_INBOX``. A credential may then receive on its own inboxes only (ops/nats/accounts.conf).
    inbox_prefix: str | None = None

    @property
    def streams(self) -> StreamNames:
        return StreamNames.with_prefix(self.stream_prefix)

    @property
    def inbox(self) -> str:
        """The inbox prefix this client subscribes under."""
        if self.inbox_prefix:
            return self.inbox_prefix
        user = "".join(c if c.isalnum() or c in "-_" else "_" for c in self.user or "")
        return f"_INBOX_{user}" if user else "_INBOX"

    def tls_context(self) -> ssl.SSLContext | None:
        if not (self.tls_ca or self.tls_cert):
            return None
        ctx = ssl.create_default_context(cafile=str(self.tls_ca) if self.tls_ca else None)
        if self.tls_cert:
            ctx.load_cert_chain(str(self.tls_cert), str(self.tls_key) if self.tls_key else None)
        return ctx


def embedded_url(state_dir: Path) -> str | None:
    """The URL of the embedded server a running ``flywheel up`` started on ``state_dir``, if it is alive."""
    try:
        info = orjson.loads((state_dir / "nats" / "embedded.json").read_bytes())
        os.kill(int(info["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return str(info["url"])


def options_from_env(environ: dict[str, str] | None = None) -> NatsOptions:
    """Options from ``FLYWHEEL_NATS__URL`` (and ``__USER``, ``__PASSWORD``, ``__TOKEN``, ``__CREDS_FILE``,
    ``__TLS_CA``, ``__TLS_CERT``, ``__TLS_KEY``, ``__INBOX_PREFIX``), else the embedded server of an engine running on
    ``FLYWHEEL_STATE_DIR`` (``.flywheel`` by default). Raises ``BusUnavailable`` when neither is there."""
    env = dict(os.environ if environ is None else environ)

    def get(key: str) -> str | None:
        return env.get(f"FLYWHEEL_NATS__{key}") or None

    def path(key: str) -> Path | None:
        value = get(key)
        return Path(value) if value else None

    url = get("URL") or embedded_url(Path(env.get("FLYWHEEL_STATE_DIR", ".flywheel")))
    if url is None:
        raise BusUnavailable(
            "no NATS URL configured and no engine running: start `flywheel up`, or set FLYWHEEL_NATS__URL"
        )
    return NatsOptions(
        url=url, user=get("USER"), password=get("PASSWORD"), token=get("TOKEN"), creds_file=path("CREDS_FILE"),
        tls_ca=path("TLS_CA"), tls_cert=path("TLS_CERT"), tls_key=path("TLS_KEY"),
        stream_prefix=env.get("FLYWHEEL_STREAMS__PREFIX", "FLYWHEEL"), inbox_prefix=get("INBOX_PREFIX"),
    )


class EventPublisher:
    """A connected NATS client with JetStream and the one way to publish events."""

    def __init__(self, nc: Client, options: NatsOptions, errors: list[str] | None = None) -> None:
        self.nc = nc
        self.options = options
        self.url = options.url
        #: Errors the server reported asynchronously (e.g. permission violations), newest last.
        self.server_errors = errors if errors is not None else []
        self.js: JetStreamContext = nc.jetstream(timeout=options.publish_timeout_s)
        self.streams = options.streams

    @staticmethod
    async def open_connection(options: NatsOptions) -> tuple[Client, list[str]]:
        """Connect (bounded by ``connect_timeout_s``; reconnects after that are unbounded)."""
        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            # The server reports a refused publish asynchronously; keep it so the publish that
            # is left without an ack can say why.
            log.debug("nats: %s", exc)
            errors.append(str(exc))
            del errors[:-20]

        opts: dict[str, Any] = dict(
            servers=[u.strip() for u in options.url.split(",")],
            connect_timeout=options.connect_timeout_s,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.25,
            error_cb=on_error,
            name=options.name,
            inbox_prefix=options.inbox,
        )
        if options.user:
            opts.update(user=options.user, password=options.password)
        if options.token:
            opts["token"] = options.token
        if options.creds_file:
            opts["user_credentials"] = str(options.creds_file)
        tls = options.tls_context()
        if tls is not None:
            opts["tls"] = tls
        try:
            nc = await asyncio.wait_for(nats.connect(**opts), options.connect_timeout_s)
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            reason = str(exc) or f"no answer within {options.connect_timeout_s:g}s"
            raise BusUnavailable(f"cannot reach NATS at {options.url}: {reason}") from None
        return nc, errors

    @classmethod
    async def connect_to(cls, options: NatsOptions) -> EventPublisher:
        nc, errors = await cls.open_connection(options)
        return cls(nc, options, errors)

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
            self.inject_trace(headers)
        return headers

    def inject_trace(self, headers: dict[str, str]) -> None:
        """Add the current trace context to outgoing headers (the engine does; an agent need not)."""

    async def encode_many(self, events: Sequence[Event[Any]]) -> list[bytes]:
        """The bytes published for each event: its JSON form. (The engine's bus seals personal text here.)"""
        out = []
        for i, event in enumerate(events):
            out.append(event.to_bytes())
            if i % _SLICE == _SLICE - 1:
                await asyncio.sleep(0)  # let the agent's own tasks run between slices of a big batch
        return out

    async def publish(self, event: Event[Any]) -> PubAck:
        """Publish one event and wait for its ack, retrying through reconnects."""
        [data] = await self.encode_many([event])
        return await self.publish_raw(event.subject, data, self._headers(event))

    async def publish_raw(self, subject: str, payload: bytes, headers: dict[str, str]) -> PubAck:
        budget = self.options.publish_retry_s
        deadline = asyncio.get_running_loop().time() + budget
        delay = 0.05
        while True:
            try:
                return await self.js.publish(subject, payload, headers=dict(headers))
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
        self, events: Sequence[Event[Any]] | Iterable[Event[Any]], trace: TraceHeaders | None = None
    ) -> list[PubAck]:
        """Publish a batch with pipelined acks; anything not acked is retried one by one.

        ``trace`` maps an event id to the trace-context headers it should carry (a worker
        publishes a batch after the spans that produced each event have ended)."""
        trace = trace or {}
        events = list(events)
        if not events:
            return []
        # encoded once: a retry re-sends the same bytes under the same id
        payloads = await self.encode_many(events)
        if len(events) == 1:
            e = events[0]
            return [await self.publish_raw(e.subject, payloads[0], self._headers(e, trace.get(e.id)))]
        futures: list[asyncio.Future[PubAck] | None] = []
        for i, (event, data) in enumerate(zip(events, payloads, strict=True)):
            if i % _SLICE == _SLICE - 1:
                await asyncio.sleep(0)  # as in encode_many: a batch never holds the event loop for long
            try:
                fut = await self.js.publish_async(
                    event.subject, data, headers=self._headers(event, trace.get(event.id))
                )
            except (TimeoutError, nats.errors.Error, OSError):
                fut = None
            futures.append(fut)
        pending = {f for f in futures if f is not None}
        if pending:
            await asyncio.wait(pending, timeout=self.options.publish_timeout_s)
        acks: list[PubAck] = []
        for event, data, fut in zip(events, payloads, futures, strict=True):
            ack = None
            if fut is not None and fut.done() and not fut.cancelled() and fut.exception() is None:
                ack = fut.result()
            elif fut is not None and not fut.done():
                fut.cancel()
            if ack is None:
                # Not acked: publish again under the same id, so it is stored at most once.
                ack = await self.publish_raw(event.subject, data, self._headers(event, trace.get(event.id)))
            acks.append(ack)
        return acks

    def _refusal(self, subject: str) -> str | None:
        """A permissions violation the server reported for ``subject``, if any."""
        for err in reversed(self.server_errors):
            if "permissions violation" in err.lower() and subject.lower() in err.lower():
                return err.removeprefix("nats: ")
        return None
