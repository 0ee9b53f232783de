"""Key stores: where the data keys that seal personal text on the log live, and how one is destroyed.

A key is 32 random bytes (AES-256), one per data subject key id (an interaction id), created once by
whichever engine process first seals something of that subject and read by every process that opens it.
Destroying a key erases its bytes and leaves a tombstone, so the subject stays forgotten: a later attempt
to create it again (intake about the subject that arrives after ``flywheel forget``) fails with
``SubjectForgotten`` instead of sealing new text under a new key.

- ``BusKeyStore``: a JetStream KV bucket (``<prefix>_KEYS``, ``streams.replicas`` replicas, file storage),
  on the bus every worker already reaches. A key is created with an expected last subject sequence of 0
  (two processes racing agree on the first); destroying it writes the KV delete marker, then erases every
  message of the key's subject that holds key bytes (JetStream overwrites an erased message in its files),
  so neither the current revision nor an old one survives in the bucket's files.
- ``FileKeyStore``: one file per key in a folder (a KMS-like store mounted from a secret manager); a key
  is created by an atomic link, destroyed by overwriting its bytes and replacing the file by a tombstone.

An unreachable store is ``KeyStoreUnavailable``, naming the store: the engine never guesses, it waits.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nats.errors
import nats.js.errors
import orjson
from nats.aio.msg import Msg
from nats.js.api import DiscardPolicy, StorageType, StreamConfig

if TYPE_CHECKING:
    from nats.js import JetStreamContext

    from flywheel_loop.engine.config import Settings

__all__ = [
    "BusKeyStore",
    "FileKeyStore",
    "KeyStore",
    "KeyStoreError",
    "KeyStoreUnavailable",
    "SubjectForgotten",
    "key_store",
    "valid_key_id",
]

KEY_BYTES = 32
#: what a destroyed key's file holds in the file store
TOMBSTONE = b"destroyed\n"
#: what a KV message carries when it is a delete or purge marker, not a key
_KV_OP = "KV-Operation"
#: the header that makes JetStream store a message only when its subject's last sequence is the one given
_EXPECTED_LAST_SUBJECT_SEQUENCE = "Nats-Expected-Last-Subject-Sequence"
#: JetStream's error codes for a wrong expected last (subject) sequence
_WRONG_LAST_SEQUENCE = (10071, 10164)


class KeyStoreError(RuntimeError):
    """The key store cannot do what was asked (the message says which store and why)."""


class KeyStoreUnavailable(KeyStoreError):
    """The key store did not answer; personal data on the log can be neither sealed nor opened."""


class SubjectForgotten(KeyStoreError):
    """The data subject's key was destroyed: nothing more is sealed for it."""

    def __init__(self, key_id: str) -> None:
        super().__init__(f"the data subject {key_id} was forgotten: its key is destroyed")
        self.key_id = key_id


#: a fetched key: its bytes, or None when it was destroyed (a key never created is absent from the answer)
Fetched = dict[str, bytes | None]

_KEY_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")


def valid_key_id(key_id: str) -> bool:
    """Whether ``key_id`` can name a key (it becomes a subject token and a file name: no dots, no wildcards,
    no slashes)."""
    return _KEY_ID.fullmatch(key_id) is not None


def _checked(key_ids: Sequence[str]) -> list[str]:
    bad = [k for k in key_ids if not valid_key_id(k)]
    if bad:
        raise KeyStoreError(f"not a key id: {bad[0]!r} (letters, digits, '-' and '_' only)")
    return list(dict.fromkeys(key_ids))


class KeyStore(ABC):
    """Create, fetch and destroy data keys by id."""

    #: names the store in messages
    where: str = ""

    @abstractmethod
    async def ensure(self) -> None:
        """Make the store ready (create the bucket or folder); idempotent."""

    @abstractmethod
    async def fetch(self, key_ids: Sequence[str]) -> Fetched:
        """The keys of ``key_ids`` that exist (None for a destroyed one); ids never created are absent."""

    @abstractmethod
    async def create(self, key_id: str) -> bytes:
        """The key of ``key_id``, created now unless it exists; ``SubjectForgotten`` if it was destroyed."""

    async def create_many(self, key_ids: Sequence[str]) -> Fetched:
        """``create`` for each of ``key_ids``: its key, or None when it was destroyed (the subject is forgotten)."""

        async def one(key_id: str) -> tuple[str, bytes | None]:
            try:
                return key_id, await self.create(key_id)
            except SubjectForgotten:
                return key_id, None

        return dict(await asyncio.gather(*(one(k) for k in _checked(key_ids))))

    @abstractmethod
    async def destroy(self, key_ids: Sequence[str]) -> int:
        """Destroy the keys (erase their bytes, leave tombstones); return how many held key bytes."""


# --------------------------------------------------------------------------- on the bus


_UNREACHABLE = (
    TimeoutError,
    asyncio.TimeoutError,
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.js.errors.ServiceUnavailableError,
    nats.js.errors.NoStreamResponseError,
    OSError,
)


class BusKeyStore(KeyStore):
    """Keys in a JetStream KV bucket: key ``<key id>`` holds the 32 key bytes."""

    def __init__(self, js: JetStreamContext, bucket: str, replicas: int = 1, timeout_s: float = 5.0) -> None:
        self.js = js
        self.bucket = bucket
        self.stream = f"KV_{bucket}"
        self.replicas = replicas
        self.timeout_s = timeout_s
        self.where = f"the JetStream KV bucket {bucket}"
        self._kv: Any = None
        self._ready = asyncio.Lock()
        self._inbox: str | None = None
        #: reply token -> the ack (or error) of a key published by ``create_many``
        self._acks: dict[str, asyncio.Future[dict[str, Any]]] = {}

    def config(self) -> StreamConfig:
        """The bucket's stream, as a KV bucket's, except that single messages may be deleted (a destroyed
        key is erased) and each key keeps two revisions (the key and its delete marker: the marker must not
        push the key out by the history limit, which would drop it without erasing its bytes)."""
        return StreamConfig(
            name=self.stream,
            description="data keys sealing personal text on the log (destroyed by flywheel forget)",
            subjects=[f"$KV.{self.bucket}.>"],
            storage=StorageType.FILE,
            num_replicas=self.replicas,
            max_msgs_per_subject=2,
            discard=DiscardPolicy.NEW,
            allow_rollup_hdrs=True,
            deny_delete=False,
            deny_purge=False,
            allow_direct=False,  # reads go to the leader: a key just created is always found
            duplicate_window=120.0,
        )

    async def ensure(self) -> None:
        await self._bucket()

    async def _bucket(self) -> Any:
        if self._kv is not None:
            return self._kv
        async with self._ready:
            if self._kv is None:
                try:
                    try:
                        await asyncio.wait_for(self.js.add_stream(self.config()), self.timeout_s)
                    except nats.js.errors.BadRequestError:
                        await asyncio.wait_for(self.js.update_stream(self.config()), self.timeout_s)
                    self._kv = await asyncio.wait_for(self.js.key_value(self.bucket), self.timeout_s)
                except _UNREACHABLE as exc:
                    raise self._unavailable(exc) from exc
                except nats.js.errors.APIError as exc:
                    raise KeyStoreError(f"{self.where} could not be created: {exc}") from exc
        return self._kv

    def _unavailable(self, exc: BaseException) -> KeyStoreUnavailable:
        return KeyStoreUnavailable(
            f"the key store ({self.where}) did not answer: {type(exc).__name__} {exc}".rstrip()
            + "; personal text on the log can be neither sealed nor read until it does"
        )

    async def _get(self, key_id: str) -> tuple[str, bytes | None] | None:
        """(id, key or None when destroyed), or None when never created: the key subject's last message."""
        await self._bucket()
        try:
            msg = await asyncio.wait_for(
                self.js.get_msg(self.stream, subject=f"$KV.{self.bucket}.{key_id}"), self.timeout_s
            )
        except nats.js.errors.NotFoundError:
            return None
        except _UNREACHABLE as exc:
            raise self._unavailable(exc) from exc
        value = bytes(msg.data or b"")
        if (msg.headers or {}).get(_KV_OP) or len(value) != KEY_BYTES:
            return key_id, None  # a delete marker: destroyed
        return key_id, value

    async def fetch(self, key_ids: Sequence[str]) -> Fetched:
        found = await asyncio.gather(*(self._get(k) for k in _checked(key_ids)))
        return dict(f for f in found if f is not None)

    async def create(self, key_id: str) -> bytes:
        _checked([key_id])
        kv = await self._bucket()
        key = secrets.token_bytes(KEY_BYTES)
        try:
            await asyncio.wait_for(kv.update(key_id, key, last=0), self.timeout_s)
            return key
        except nats.js.errors.KeyWrongLastSequenceError:
            pass  # created by another process first, or destroyed: take what is there
        except _UNREACHABLE as exc:
            raise self._unavailable(exc) from exc
        got = await self._get(key_id)
        if got is None:
            raise KeyStoreError(f"{self.where}: key {key_id} exists but cannot be read")
        if got[1] is None:
            raise SubjectForgotten(key_id)
        return got[1]

    async def _replies(self) -> str:
        """The inbox prefix the acks of ``create_many`` come back on (one subscription for all of them).

        Not nats-py's ``publish_async``: its reply handler raises instead of failing the future when
        JetStream answers with an error (a key another process made first), so that future never ends."""
        if self._inbox is None:
            nc = self.js._nc
            prefix = nc.new_inbox()

            async def on_reply(msg: Msg) -> None:
                fut = self._acks.pop(msg.subject.rsplit(".", 1)[-1], None)
                if fut is None or fut.done():
                    return
                if not msg.data:  # a status without a body: no responders (no stream takes the subject)
                    fut.set_exception(nats.errors.NoRespondersError())
                    return
                try:
                    answer = orjson.loads(msg.data)
                except orjson.JSONDecodeError:
                    answer = {"error": {"description": "an ack that is not JSON"}}
                fut.set_result(answer if isinstance(answer, dict) else {"error": {"description": str(answer)}})

            await nc.subscribe(f"{prefix}.*", cb=on_reply)
            self._inbox = prefix
        return self._inbox

    async def create_many(self, key_ids: Sequence[str]) -> Fetched:
        """``create`` for many keys in one pipelined round: each key is published with an expected last
        subject sequence of 0 (as ``create`` does through the KV API) without waiting for its ack before
        sending the next; those another process made first (or destroyed) are read back after."""
        key_ids = _checked(key_ids)
        if len(key_ids) <= 1:
            return await super().create_many(key_ids)
        await self._bucket()
        made = {k: secrets.token_bytes(KEY_BYTES) for k in key_ids}
        loop = asyncio.get_running_loop()
        futures: dict[str, asyncio.Future[dict[str, Any]]] = {}
        try:
            inbox = await self._replies()
            nc = self.js._nc
            for key_id, key in made.items():
                token = secrets.token_hex(12)
                futures[key_id] = self._acks[token] = loop.create_future()
                await nc.publish(f"$KV.{self.bucket}.{key_id}", key, reply=f"{inbox}.{token}",
                                 headers={_EXPECTED_LAST_SUBJECT_SEQUENCE: "0"})
            await asyncio.wait(futures.values(), timeout=self.timeout_s)
        except _UNREACHABLE as exc:
            raise self._unavailable(exc) from exc
        finally:
            for fut in futures.values():
                if not fut.done():
                    fut.cancel()
            for token in [t for t, f in self._acks.items() if f.done()]:
                self._acks.pop(token, None)
        out: Fetched = {}
        taken: list[str] = []  # created elsewhere first, or destroyed: read what is there
        for key_id, fut in futures.items():
            if fut.cancelled():
                raise self._unavailable(TimeoutError(f"no ack for key {key_id} within {self.timeout_s:g}s"))
            if fut.exception() is not None:
                raise self._unavailable(fut.exception() or Exception())
            error = fut.result().get("error")
            if not error:
                out[key_id] = made[key_id]
            elif isinstance(error, dict) and error.get("err_code") in _WRONG_LAST_SEQUENCE:
                taken.append(key_id)
            else:
                raise KeyStoreError(f"{self.where}: could not create key {key_id}: {error}")
        for found in await asyncio.gather(*(self._get(k) for k in taken)):
            if found is None:
                raise KeyStoreError(f"{self.where}: a key exists but cannot be read")
            out[found[0]] = found[1]
        return out

    async def destroy(self, key_ids: Sequence[str]) -> int:
        kv = await self._bucket()
        erased = 0
        for key_id in _checked(key_ids):
            subject = f"$KV.{self.bucket}.{key_id}"
            try:
                # the marker first: from now on nothing can create the key again
                await asyncio.wait_for(kv.delete(key_id), self.timeout_s)
                seq = 1
                while True:
                    try:
                        msg = await asyncio.wait_for(
                            self.js.get_msg(self.stream, seq=seq, subject=subject, next=True), self.timeout_s
                        )
                    except nats.js.errors.NotFoundError:
                        break
                    if msg.seq is None:
                        break
                    if not (msg.headers or {}).get(_KV_OP):
                        await asyncio.wait_for(self.js.delete_msg(self.stream, msg.seq), self.timeout_s)
                        erased += 1
                    seq = msg.seq + 1
            except _UNREACHABLE as exc:
                raise self._unavailable(exc) from exc
            except nats.js.errors.APIError as exc:
                raise KeyStoreError(f"{self.where}: could not destroy key {key_id}: {exc}") from exc
        return erased


# --------------------------------------------------------------------------- in a folder


class FileKeyStore(KeyStore):
    """Keys as files ``<folder>/<key id>`` (32 bytes each; a tombstone once destroyed)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.where = f"the key folder {self.folder}"

    def _unavailable(self, exc: OSError) -> KeyStoreUnavailable:
        return KeyStoreUnavailable(
            f"the key store ({self.where}) cannot be used: {exc.strerror or exc}"
            "; personal text on the log can be neither sealed nor read until it can"
        )

    async def ensure(self) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise self._unavailable(exc) from exc

    def _read(self, key_id: str) -> bytes | None | bool:
        """The key, None when destroyed, False when never created."""
        try:
            value = (self.folder / key_id).read_bytes()
        except FileNotFoundError:
            if not self.folder.is_dir():
                raise self._unavailable(FileNotFoundError(2, "no such folder")) from None
            return False
        except OSError as exc:
            raise self._unavailable(exc) from exc
        return value if len(value) == KEY_BYTES else None

    async def fetch(self, key_ids: Sequence[str]) -> Fetched:
        out: Fetched = {}
        for key_id in _checked(key_ids):
            value = self._read(key_id)
            if value is not False:
                out[key_id] = value if isinstance(value, bytes) else None
        return out

    def _write_new(self, key_id: str, data: bytes) -> bool:
        """Write ``data`` as ``key_id`` unless it exists (atomically: a temporary file, then a link)."""
        tmp = self.folder / f".{key_id}.{secrets.token_hex(8)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, self.folder / key_id)
                return True
            except FileExistsError:
                return False
        except OSError as exc:
            raise self._unavailable(exc) from exc
        finally:
            tmp.unlink(missing_ok=True)

    async def create(self, key_id: str) -> bytes:
        _checked([key_id])
        key = secrets.token_bytes(KEY_BYTES)
        if self._write_new(key_id, key):
            return key
        value = self._read(key_id)
        if isinstance(value, bytes):
            return value
        raise SubjectForgotten(key_id)

    async def destroy(self, key_ids: Sequence[str]) -> int:
        erased = 0
        for key_id in _checked(key_ids):
            path = self.folder / key_id
            try:
                if self._write_new(key_id, TOMBSTONE):
                    continue  # never created: the tombstone keeps it from being created
                with path.open("r+b") as f:
                    if len(f.read()) == KEY_BYTES:
                        f.seek(0)
                        f.write(secrets.token_bytes(KEY_BYTES))  # overwrite the key's bytes where they were
                        f.flush()
                        os.fsync(f.fileno())
                        erased += 1
                tmp = self.folder / f".{key_id}.{secrets.token_hex(8)}.tmp"
                tmp.write_bytes(TOMBSTONE)
                os.replace(tmp, path)
            except OSError as exc:
                raise self._unavailable(exc) from exc
        return erased


def key_store(settings: Settings, js: JetStreamContext) -> KeyStore:
    """The key store ``settings.keys`` describes."""
    cfg = settings.keys
    if cfg.store == "file":
        assert cfg.folder is not None  # the config refuses a file store without a folder
        return FileKeyStore(cfg.folder)
    return BusKeyStore(js, f"{settings.streams.prefix}_KEYS", settings.streams.replicas, cfg.timeout_s)
