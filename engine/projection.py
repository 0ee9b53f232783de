"""Projections: read models folded from the log, each in its own SQLite file.

A projection stores the last stream sequence it applied in the same transaction as the
state it folded (eventsourcing's tracking record), so:

- after a crash it resumes from exactly where its last commit left it: no event is lost
  or applied twice;
- it can be rebuilt from the start of the stream, or up to a sequence or a time, into a
  fresh file, and compared with the live one.

The runner reads with an ephemeral, ack-less pull consumer starting at ``position + 1``; if
the consumer vanishes (a NATS restart), it recreates it from the stored position.

Events are opened before they are applied (``engine/sealing.py``): a projection folds the
payload as it was published. An event whose data subject was forgotten arrives with
``event.forgotten`` set and its personal fields blank; everything else in it is as it was, so a
projection that folds only what is not personal (counts, roles, hashes) rebuilds the same rows
before and after a forget. A projection that keeps personal text skips such events (and deletes
its rows on ``data.forgotten``).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from flywheel_loop.engine.bus import Bus, fetch_batch
from flywheel_loop.engine.consumes import ConsumesEvents
from flywheel_loop.engine.keys import KeyStoreError
from flywheel_loop.engine.sealing import Opened
from flywheel_loop.schemas import Event, InvalidEvent, parse_event

log = logging.getLogger(__name__)


class Projection(ConsumesEvents):
    """Base class for a read model. Subclasses set ``name``, ``consumes`` and ``tables``,
    and implement ``apply``; bump ``version`` when the schema or the fold changes, and the
    store is rebuilt from the log."""

    name: str = ""
    consumes: tuple[str, ...] = ()
    version: int = 1
    #: SQL run once when the store is created.
    tables: str = ""
    #: whether ``apply`` reads personal fields (``schemas/personal.py``). False: the runner folds events
    #: as stored, their personal fields blank and sealed (``event.forgotten`` reads True), and fetches no
    #: key and decrypts nothing for them (a count by type, by finding kind, ...).
    personal: bool = True

    def apply(self, db: sqlite3.Connection, event: Event[Any], seq: int) -> None:
        """Fold one event into the tables (inside the runner's transaction)."""
        raise NotImplementedError


@dataclass(frozen=True)
class Position:
    seq: int
    applied: int
    skipped: int
    version: int


class ProjectionStore:
    """The SQLite file of one projection, with its tracking row."""

    def __init__(self, projection: Projection, path: Path, secure_delete: bool = False) -> None:
        self.projection = projection
        self.secure_delete = secure_delete
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = self._open()
        pos = self.position()
        if pos.version != projection.version and pos.seq > 0:
            log.warning("projection %s changed version; rebuilding from the log", projection.name)
            self.db.close()
            self.path.unlink()
            self.db = self._open()

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        if self.secure_delete:  # deleted rows are overwritten: forgotten data leaves no bytes behind
            db.execute("PRAGMA secure_delete=ON")
        db.executescript(
            "CREATE TABLE IF NOT EXISTS _position (one INTEGER PRIMARY KEY CHECK (one = 1),"
            " seq INTEGER NOT NULL, applied INTEGER NOT NULL, skipped INTEGER NOT NULL,"
            " version INTEGER NOT NULL, updated TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)"
        )
        if self.projection.tables:
            db.executescript(self.projection.tables)
        db.execute(
            "INSERT OR IGNORE INTO _position (one, seq, applied, skipped, version) VALUES (1, 0, 0, 0, ?)",
            (self.projection.version,),
        )
        return db

    def position(self) -> Position:
        row = self.db.execute("SELECT seq, applied, skipped, version FROM _position").fetchone()
        return Position(*row)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def apply_batch(self, messages: Sequence[tuple[int, bytes | Opened, datetime | None]]) -> int:
        """Apply (sequence, message) pairs above the stored position in one transaction; a message is
        the raw bytes of an event that needs no opening, or what ``Bus.open_many`` made of it."""
        applied, skipped = 0, 0
        with self.transaction() as db:
            # Read the position inside the write lock: another process folding the same store
            # (e.g. `flywheel stats` beside `flywheel up`) may have moved it.
            seq = self.position().seq
            for msg_seq, data, _ in messages:
                if msg_seq <= seq:
                    continue  # already applied before a crash or a redelivery
                try:
                    event = parse_event(data) if isinstance(data, bytes) else data
                    if isinstance(event, InvalidEvent):
                        raise event
                except InvalidEvent:
                    skipped += 1  # the processors reject it; a projection just skips it
                else:
                    if event.type in self.projection.consumes:
                        self.projection.apply(db, event, msg_seq)
                        applied += 1
                seq = msg_seq
            db.execute(
                "UPDATE _position SET seq = ?, applied = applied + ?, skipped = skipped + ?,"
                " version = ?, updated = CURRENT_TIMESTAMP",
                (seq, applied, skipped, self.projection.version),
            )
        return seq

    def close(self) -> None:
        self.db.close()


class ProjectionRunner:
    """Keeps one projection up to date with its stream."""

    def __init__(
        self, bus: Bus, projection: Projection, path: Path, batch: int = 1000, secure_delete: bool = False
    ) -> None:
        self.bus = bus
        self.projection = projection
        self.store = ProjectionStore(projection, path, secure_delete)
        self.batch = batch
        self._sub: Any = None
        # `catch_up` may be called while `run` follows the stream: one fetch at a time.
        self._lock = asyncio.Lock()

    @property
    def stream_name(self) -> str:
        return self.bus.streams.for_stream(self.projection.stream)

    async def _subscribe(self, start_seq: int) -> Any:
        config = ConsumerConfig(
            ack_policy=AckPolicy.NONE,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=max(start_seq, 1),
            inactive_threshold=300.0,
            mem_storage=True,
        )
        subjects = self.projection.subjects
        if len(subjects) == 1:
            config.filter_subject = subjects[0]
        else:
            config.filter_subjects = subjects
        return await self.bus.js.pull_subscribe(
            subjects[0], stream=self.stream_name, config=config, pending_msgs_limit=4 * self.batch
        )

    async def _drop_subscription(self) -> None:
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except (TimeoutError, nats.errors.Error):
                pass
            self._sub = None

    async def step(self, timeout: float = 1.0, until_seq: int | None = None,
                   until_time: datetime | None = None) -> int:
        """Fetch and apply one batch; return how many messages were read (0: none waiting).
        ``KeyStoreError`` when sealed events could not be opened (nothing was applied)."""
        async with self._lock:
            return await self._step(timeout, until_seq, until_time)

    async def _step(self, timeout: float, until_seq: int | None, until_time: datetime | None) -> int:
        try:
            if self._sub is None:
                self._sub = await self._subscribe(self.store.position().seq + 1)
            msgs = await fetch_batch(self._sub, self.batch, timeout)
        except nats.errors.TimeoutError:
            return 0
        except (TimeoutError, nats.errors.Error, nats.js.errors.Error) as exc:
            log.info("projection %s: consumer lost (%s); resubscribing", self.projection.name, exc)
            await self._drop_subscription()
            await asyncio.sleep(0.2)
            return 0
        taken = []
        for msg in msgs:
            meta = msg.metadata
            seq = meta.sequence.stream
            if until_seq is not None and seq > until_seq:
                break
            if until_time is not None and meta.timestamp and meta.timestamp > until_time:
                break
            taken.append(msg)
        if taken:
            await self._apply(taken)
        return len(taken) if len(taken) == len(msgs) else -1

    async def _apply(self, msgs: list[Any]) -> None:
        """Open and apply fetched messages in one transaction (``KeyStoreError``: nothing applied, and the
        subscription starts again from the stored position)."""
        try:
            raws = [msg.data for msg in msgs]
            opened = await self.bus.open_many(raws) if self.projection.personal else self.bus.keys.as_stored(raws)
        except KeyStoreError:
            await self._drop_subscription()
            raise
        self.store.apply_batch([
            (msg.metadata.sequence.stream, item, msg.metadata.timestamp) for msg, item in zip(msgs, opened, strict=True)
        ])

    async def catch_up(self, until_seq: int | None = None, until_time: datetime | None = None) -> int:
        """Apply everything up to the stream's current end (or a bound); return the position."""
        target = await self.bus.last_sequence(self.projection.stream)
        if until_seq is not None:
            target = min(target, until_seq)
        while self.store.position().seq < target:
            n = await self.step(timeout=0.5, until_seq=target, until_time=until_time)
            if n < 0:
                break  # reached the time bound
            if n == 0 and await self._nothing_pending():
                break  # no more messages match the filter up to the target
        async with self._lock:
            await self._drop_subscription()
        return self.store.position().seq

    async def follow_up(self) -> int:
        """Apply whatever its consumer has pending now and keep the consumer (a processor's fold,
        brought up to date before each batch): one consumer-info request when nothing is new. A consumer
        the server deleted (idle past its inactive threshold: a processor whose inputs are rare) is
        subscribed again from the stored position, once a call."""
        async with self._lock:
            resubscribed = False
            for _ in range(1000):  # a bound: 1,000 fetches of ``batch`` messages, then the next call goes on
                try:
                    if self._sub is None:
                        self._sub = await self._subscribe(self.store.position().seq + 1)
                    pending = int((await self._sub.consumer_info()).num_pending or 0)
                    if pending == 0:
                        break
                    msgs = await self._sub.fetch(min(self.batch, pending), timeout=5.0)
                except nats.js.errors.NotFoundError:
                    await self._drop_subscription()
                    if resubscribed:
                        raise
                    resubscribed = True
                    continue
                except (TimeoutError, nats.errors.Error, nats.js.errors.Error) as exc:
                    log.info("projection %s: consumer lost (%s); resubscribing", self.projection.name, exc)
                    await self._drop_subscription()
                    raise
                if msgs:
                    await self._apply(msgs)
        return self.store.position().seq

    async def _nothing_pending(self) -> bool:
        if self._sub is None:
            return False
        try:
            info = await self._sub.consumer_info()
        except (TimeoutError, nats.errors.Error, nats.js.errors.Error):
            return False
        return int(info.num_pending) == 0 and int(info.num_ack_pending or 0) == 0

    async def run(self, stop: asyncio.Event) -> None:
        """Follow the stream until ``stop`` is set."""
        try:
            while not stop.is_set():
                try:
                    await self.step(timeout=1.0)
                except KeyStoreError as exc:
                    log.error("projection %s: %s; retrying", self.projection.name, exc)
                    await asyncio.sleep(1.0)
        finally:
            await self._drop_subscription()

    def close(self) -> None:
        self.store.close()
