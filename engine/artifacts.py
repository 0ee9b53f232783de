"""Artifacts on the bus: datasets, adapters, run checkpoints and base models as objects in a
JetStream object store, with the local state folder as their cache.

One folder is one object. A folder ``<state_dir>/<kind>/<key>`` (``datasets/<sha256>``,
``adapters/<sha256>``, ``runs/<run_id>``, ``models/<name>-<key>``) is published as the object
``<kind>/<key>`` in the bucket ``<streams.prefix>_ARTIFACTS`` (stream ``OBJ_<prefix>_ARTIFACTS``,
``streams.replicas`` replicas): an uncompressed tar of its files in name order with fixed
owners, modes and times, so the same files give the same bytes, cut into chunks of
``artifacts.chunk_kib``. A folder travels whole or not at all: JetStream writes the object's
metadata (size, chunk count, SHA-256) after its last chunk, and a fetched folder is renamed into
the cache only once it is complete and verified, as a folder made on this machine is. Files whose
name starts with a dot are scratch (locks, temporary files) and are not published.

- **Publish when made.** ``publish`` uploads a folder unless an object of that name is already
  there (content-addressed kinds: the name is the hash, so there is nothing to compare);
  ``replace=True`` uploads again (a run's newest checkpoint). ``headers`` travel with the object
  (``Flywheel-Step``), readable without fetching it (``info``).
- **Fetch on use, verified.** ``local`` answers with the cache folder when it is there and
  fetches it otherwise; ``fetch`` always downloads. A download checks the chunk count, the size
  and the SHA-256 JetStream recorded, extracts into a temporary folder, runs the caller's
  ``verify`` (which recomputes the content hash the key claims: a dataset's manifest, an
  adapter's weights) and only then renames it into place. A missing object is
  ``ArtifactMissing``, one that fails a check is ``ArtifactCorrupt``; either names the object
  and why, and nothing is left in the cache.
- **Delete erases.** ``delete`` erases every chunk message (JetStream overwrites the bytes)
  before marking the object deleted: a dataset superseded because data in it was forgotten
  leaves nothing readable on the bus.

The engine makes one store per bus (``bus.artifacts``) and hands it to processors as
``ctx.artifacts``; code running in a worker thread uses ``store.in_thread()``, whose calls run
on the engine's event loop and wait for the answer.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import hashlib
import logging
import os
import re
import shutil
import tarfile
import uuid
from collections.abc import Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import nats.errors
import nats.js.errors
from nats.js import api
from nats.js.object_store import ObjectStore

from flywheel_loop.engine.config import Settings

if TYPE_CHECKING:
    from nats.js.client import JetStreamContext

__all__ = [
    "KINDS",
    "ArtifactCorrupt",
    "ArtifactError",
    "ArtifactInfo",
    "ArtifactMissing",
    "ArtifactStore",
    "NotFoundAnywhere",
    "ThreadArtifacts",
    "Verifier",
    "find_folder",
]

log = logging.getLogger(__name__)

#: the kinds of artifacts, each a folder of the state layout
KINDS = ("datasets", "adapters", "runs", "models")
KEY_PATTERN = re.compile(r"^[A-Za-z0-9][-_.A-Za-z0-9]{0,199}$")
#: every header Flywheel writes starts with this
HEADER_PREFIX = "Flywheel-"
#: a verifier gets the extracted folder and says why it is not the artifact its key names (None: it is)
Verifier = Callable[[Path], str | None]

T = TypeVar("T")


class ArtifactError(RuntimeError):
    """An artifact that cannot be had now (the bus too slow or unreachable): worth another try. The
    message names it and says why."""


class ArtifactMissing(ArtifactError):
    """Neither in the local cache nor on the bus: another try will not help."""


class NotFoundAnywhere(ArtifactMissing):
    """Not in the local cache, not on the bus, not at the path an event names: ``looked`` says where."""

    def __init__(self, looked: list[str]) -> None:
        super().__init__(", ".join(looked))
        self.looked = looked


class ArtifactCorrupt(ArtifactError):
    """Stored bytes that fail a check (chunks missing, size, SHA-256, or the caller's content hash):
    another try will not help."""


@dataclass(frozen=True)
class ArtifactInfo:
    """An object on the bus, as its metadata describes it (nothing is downloaded)."""

    kind: str
    key: str
    size: int
    chunks: int
    #: SHA-256 of the object's bytes (the tar), hex
    sha256: str
    modified: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.kind}/{self.key}"


def object_name(kind: str, key: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown artifact kind {kind!r}: one of {', '.join(KINDS)}")
    if not KEY_PATTERN.match(key):
        raise ValueError(f"artifact key {key!r}: letters, digits, '-', '_' and '.' only")
    return f"{kind}/{key}"


# --------------------------------------------------------------------------- tar


def _tarinfo(name: str, size: int, directory: bool) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = 0 if directory else size
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    info.mode = 0o755 if directory else 0o644
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _published_files(folder: Path) -> Iterator[tuple[str, Path]]:
    """(name in the archive, path) of every file and folder to publish, in name order; dot-files
    (locks, temporary files) are left out, links are followed."""
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue
        yield rel.as_posix(), path


def pack(folder: Path, target: Path) -> int:
    """Write ``folder`` as a deterministic tar to ``target``; return how many files it holds."""
    files = 0
    with open(target, "wb") as fh, tarfile.open(fileobj=fh, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, path in _published_files(folder):
            if path.is_dir():
                tar.addfile(_tarinfo(name, 0, directory=True))
                continue
            with open(path, "rb") as src:
                size = os.fstat(src.fileno()).st_size
                tar.addfile(_tarinfo(name, size, directory=False), src)
            files += 1
    return files


def unpack(archive: Path, target: Path) -> None:
    """Extract ``archive`` into the new folder ``target`` (only plain files and folders inside it)."""
    target.mkdir(parents=True)
    with tarfile.open(archive, mode="r") as tar:
        tar.extractall(target, filter="data")


def _b64_sha256(digest: str | None) -> str:
    """The hex SHA-256 of a JetStream object digest (``SHA-256=<urlsafe base64>``); '' without one."""
    if not digest:
        return ""
    raw = digest.split("=", 1)[1] if digest.upper().startswith("SHA-256=") else digest
    try:
        return base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).hex()
    except ValueError:
        return ""


def _headers_out(headers: Mapping[str, str]) -> dict[str, list[str]]:
    # JetStream object metadata keeps headers as NATS headers (name -> list of values), as the Go client and
    # the `nats` CLI read them
    return {k: [str(v)] for k, v in headers.items()}


def _headers_in(raw: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in (raw or {}).items():
        if isinstance(v, list):
            out[str(k)] = str(v[0]) if v else ""
        else:
            out[str(k)] = str(v)
    return out


# --------------------------------------------------------------------------- the store


class ArtifactStore:
    """The artifact bucket on one bus, and the state folder that caches it."""

    def __init__(self, js: JetStreamContext, settings: Settings, max_payload: int = 1 << 20) -> None:
        self.js = js
        self.settings = settings
        self.config = settings.artifacts
        self.bucket = f"{settings.streams.prefix}_ARTIFACTS"
        self.stream = f"OBJ_{self.bucket}"
        # a chunk and its headers must fit in one message
        self.chunk_size = max(4096, min(self.config.chunk_kib * 1024, max_payload - 16 * 1024))
        self._store: ObjectStore | None = None
        self._lock = asyncio.Lock()

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    def cache_path(self, kind: str, key: str) -> Path:
        """Where ``<kind>/<key>`` lives in the local state folder."""
        object_name(kind, key)
        return self.settings.layout.artifact(kind, key)

    # ------------------------------------------------------------------ bucket

    async def _bucket(self) -> ObjectStore:
        if self._store is not None:
            return self._store
        async with self._lock:
            if self._store is None:
                self._store = await self._patiently(self._open_bucket)
        return self._store

    async def _patiently(self, call: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """``call()``, retried while JetStream does not answer (a cluster electing a leader after a node
        died) for up to ``artifacts.stall_timeout_s``; then the last error."""
        deadline = asyncio.get_running_loop().time() + self.config.stall_timeout_s
        while True:
            try:
                return await call()
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError,
                    nats.js.errors.ServiceUnavailableError):
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.3)

    async def _meta(self, name: str) -> api.ObjectInfo | None:
        """The object's metadata, or None when there is none (or it was deleted)."""
        store = await self._bucket()

        async def get() -> api.ObjectInfo | None:
            try:
                return await store.get_info(name)
            except (nats.js.errors.ObjectNotFoundError, nats.js.errors.NotFoundError):
                return None
            except nats.js.errors.BadObjectMetaError as exc:
                raise ArtifactCorrupt(f"{name}: its metadata on the bus does not parse ({exc!r})") from None

        return await self._patiently(get)

    async def _open_bucket(self) -> ObjectStore:
        replicas = self.settings.streams.replicas
        try:
            store = await self.js.object_store(self.bucket)
        except nats.js.errors.BucketNotFoundError:
            config = api.ObjectStoreConfig(
                description="Flywheel's artifacts: datasets, adapters, run checkpoints, base models",
                storage=api.StorageType.FILE,
                replicas=replicas,
                max_bytes=self.config.max_bytes or -1,
            )
            try:
                return await self.js.create_object_store(self.bucket, config=config)
            except nats.js.errors.BadRequestError:  # made by another process meanwhile
                return await self.js.object_store(self.bucket)
        info = await self.js.stream_info(self.stream)
        wanted_bytes = self.config.max_bytes or -1
        if info.config.num_replicas != replicas or (info.config.max_bytes or -1) != wanted_bytes:
            info.config.num_replicas = replicas
            info.config.max_bytes = wanted_bytes
            await self.js.update_stream(info.config)
        return store

    # ------------------------------------------------------------------ reading

    async def info(self, kind: str, key: str) -> ArtifactInfo | None:
        """The object ``<kind>/<key>`` on the bus, or None (also when artifacts are switched off)."""
        name = object_name(kind, key)
        if not self.enabled:
            return None
        meta = await self._meta(name)
        return self._describe(kind, key, meta) if meta is not None else None

    @staticmethod
    def _describe(kind: str, key: str, meta: api.ObjectInfo) -> ArtifactInfo:
        return ArtifactInfo(
            kind=kind, key=key, size=int(meta.size or 0), chunks=int(meta.chunks or 0),
            sha256=_b64_sha256(meta.digest), modified=meta.mtime or "", headers=_headers_in(meta.headers),
        )

    async def objects(self, kind: str | None = None) -> list[ArtifactInfo]:
        """Every object on the bus (of ``kind``), by name."""
        if not self.enabled:
            return []
        store = await self._bucket()
        try:
            metas = await store.list(ignore_deletes=True)
        except nats.js.errors.NotFoundError:
            return []
        out = []
        for meta in metas:
            k, _, key = (meta.name or "").partition("/")
            if k in KINDS and (kind is None or k == kind) and not meta.deleted:
                out.append(self._describe(k, key, meta))
        return sorted(out, key=lambda a: a.name)

    async def local(self, kind: str, key: str, verify: Verifier | None = None) -> Path:
        """The cache folder of ``<kind>/<key>``: as it is when present, fetched from the bus otherwise."""
        folder = self.cache_path(kind, key)
        if folder.is_dir():
            return folder
        return await self.fetch(kind, key, verify=verify)

    async def fetch(self, kind: str, key: str, verify: Verifier | None = None, into: Path | None = None) -> Path:
        """Download ``<kind>/<key>`` into ``into`` (default: its cache folder), checked and verified, and
        return the folder. A folder already there is replaced (a newer checkpoint of a run)."""
        name = object_name(kind, key)
        target = into if into is not None else self.cache_path(kind, key)
        if not self.enabled:
            raise ArtifactMissing(f"{name} is not in {target.parent} and artifacts.enabled is false")
        meta = await self._meta(name)
        if meta is None:
            raise ArtifactMissing(f"{name} is neither in {target.parent} nor on the bus")
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = target.parent / f".fetch-{target.name[:40]}-{uuid.uuid4().hex[:8]}"
        archive = scratch.with_suffix(".tar")
        try:
            await self._download(name, meta, archive)
            await asyncio.to_thread(self._install, name, archive, scratch, target, verify)
        finally:
            archive.unlink(missing_ok=True)
            if scratch.exists():
                await asyncio.to_thread(shutil.rmtree, scratch, True)
        log.info("fetched %s (%d bytes) into %s", name, meta.size or 0, target)
        return target

    async def _download(self, name: str, meta: api.ObjectInfo, archive: Path) -> None:
        """Write the object's chunks to ``archive``, checking count, size and SHA-256 as they come."""
        expected_chunks = int(meta.chunks or 0)
        expected_size = int(meta.size or 0)
        want = _b64_sha256(meta.digest)
        h = hashlib.sha256()
        size = 0
        seen = 0
        stall = self.config.stall_timeout_s
        with open(archive, "wb") as fh:
            if expected_chunks:
                subject = f"$O.{self.bucket}.C.{meta.nuid}"
                sub = await self._patiently(lambda: self.js.subscribe(subject, ordered_consumer=True))
                try:
                    while seen < expected_chunks:
                        try:
                            msg = await sub.next_msg(timeout=stall)
                        except nats.errors.TimeoutError:
                            await self._stalled(name, subject, seen, expected_chunks)
                            raise  # not reached: _stalled raises
                        fh.write(msg.data)
                        h.update(msg.data)
                        size += len(msg.data)
                        seen += 1
                finally:
                    try:
                        await sub.unsubscribe()
                    except nats.errors.Error:
                        pass
        if size != expected_size:
            raise ArtifactCorrupt(f"{name}: {size} bytes arrived, its metadata says {expected_size}")
        if h.hexdigest() != want:
            raise ArtifactCorrupt(
                f"{name}: SHA-256 of the bytes is {h.hexdigest()[:16]}..., its metadata says {want[:16] or 'none'}..."
            )

    async def _stalled(self, name: str, subject: str, seen: int, expected: int) -> None:
        """A download that stopped: corrupt when the chunks are not all on the bus, otherwise the bus is
        slow or unreachable (``ArtifactError``: worth another try)."""
        stall = self.config.stall_timeout_s
        try:
            info = await self.js.stream_info(self.stream, subjects_filter=subject)
            stored = sum((info.state.subjects or {}).values())
        except nats.errors.Error:
            stored = None
        if stored is not None and stored < expected:
            raise ArtifactCorrupt(f"{name}: only {stored} of its {expected} chunks are on the bus")
        raise ArtifactError(f"{name}: chunk {seen + 1} of {expected} did not arrive within {stall:g}s")

    @staticmethod
    def _install(name: str, archive: Path, scratch: Path, target: Path, verify: Verifier | None) -> None:
        try:
            unpack(archive, scratch)
        except (tarfile.TarError, OSError) as exc:
            raise ArtifactCorrupt(f"{name}: not a readable archive ({exc})") from None
        if verify is not None:
            problem = verify(scratch)
            if problem:
                raise ArtifactCorrupt(f"{name} fails verification: {problem}")
        if target.exists():  # a newer version of a mutable artifact (a run): swap it in
            old = target.parent / f".replaced-{target.name[:40]}-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
            os.rename(scratch, target)
            shutil.rmtree(old, ignore_errors=True)
            return
        try:
            os.rename(scratch, target)
        except OSError:  # another process fetched it first: that folder is the same artifact
            if not target.is_dir():
                raise

    # ------------------------------------------------------------------ writing

    def _scratch_tar(self) -> Path:
        tmp = self.settings.layout.cache / "artifacts"
        tmp.mkdir(parents=True, exist_ok=True)
        return tmp / f".publish-{uuid.uuid4().hex}.tar"

    def packed(self, folder: Path) -> tuple[Path, int]:
        """(a tar of ``folder`` in the cache's scratch space, how many files it holds); the caller
        hands it to ``upload`` (which deletes it). Made here, so a folder that changes later (the
        next checkpoint) is published as it was."""
        if not folder.is_dir():
            raise ArtifactMissing(f"{folder} is not a folder: nothing to publish")
        archive = self._scratch_tar()
        try:
            files = pack(folder, archive)
        except BaseException:
            archive.unlink(missing_ok=True)
            raise
        return archive, files

    async def publish(
        self,
        kind: str,
        key: str,
        folder: Path | None = None,
        headers: Mapping[str, str] | None = None,
        replace: bool = False,
    ) -> ArtifactInfo | None:
        """Publish ``folder`` (default: its cache folder) as ``<kind>/<key>``; an object already there
        is kept unless ``replace``. None when artifacts are switched off."""
        object_name(kind, key)
        if not self.enabled:
            return None
        if not replace:
            existing = await self.info(kind, key)
            if existing is not None:
                return existing
        source = folder if folder is not None else self.cache_path(kind, key)
        archive, files = await asyncio.to_thread(self.packed, source)
        return await self.upload(kind, key, archive, files, headers)

    async def upload(
        self, kind: str, key: str, archive: Path, files: int, headers: Mapping[str, str] | None = None
    ) -> ArtifactInfo | None:
        """Upload a tar made by ``packed`` as ``<kind>/<key>`` (replacing what is there), then delete it."""
        name = object_name(kind, key)
        try:
            if not self.enabled:
                return None
            store = await self._bucket()
            all_headers = {f"{HEADER_PREFIX}Kind": kind, f"{HEADER_PREFIX}Key": key,
                           f"{HEADER_PREFIX}Files": str(files), **(headers or {})}
            meta = api.ObjectMeta(
                name=name,
                description=f"flywheel {kind[:-1]} {key}",
                headers=_headers_out(all_headers),
                options=api.ObjectMetaOptions(max_chunk_size=self.chunk_size),
            )
            with open(archive, "rb") as fh:
                stored = await store.put(name, fh, meta=meta)
        finally:
            archive.unlink(missing_ok=True)
        info = ArtifactInfo(kind=kind, key=key, size=int(stored.size or 0), chunks=int(stored.chunks or 0),
                            sha256=_b64_sha256(stored.digest), modified=stored.mtime or "", headers=all_headers)
        log.info("published %s (%d files, %d bytes, %d chunks)", name, files, info.size, info.chunks)
        return info

    async def delete(self, kind: str, key: str) -> bool:
        """Erase ``<kind>/<key>`` from the bus (its chunks' bytes overwritten, then marked deleted);
        False when it was not there."""
        name = object_name(kind, key)
        if not self.enabled:
            return False
        store = await self._bucket()
        meta = await self._meta(name)
        if meta is None:
            return False
        for seq in await self._chunk_sequences(meta):
            try:
                await self.js.delete_msg(self.stream, seq)  # erases: JetStream overwrites the message
            except nats.js.errors.NotFoundError:
                pass
        try:
            await store.delete(name)
        except (nats.js.errors.ObjectNotFoundError, nats.js.errors.NotFoundError):
            pass
        return True

    async def _chunk_sequences(self, meta: api.ObjectInfo) -> list[int]:
        expected = int(meta.chunks or 0)
        if not expected:
            return []
        subject = f"$O.{self.bucket}.C.{meta.nuid}"
        sub = await self._patiently(lambda: self.js.subscribe(subject, ordered_consumer=True))
        seqs: list[int] = []
        try:
            while len(seqs) < expected:
                try:
                    msg = await sub.next_msg(timeout=self.config.stall_timeout_s)
                except nats.errors.TimeoutError:
                    break  # some are gone already
                seqs.append(int(msg.metadata.sequence.stream))
        finally:
            try:
                await sub.unsubscribe()
            except nats.errors.Error:
                pass
        return seqs

    # ------------------------------------------------------------------ threads

    def in_thread(self) -> ThreadArtifacts:
        """This store for code that runs in a worker thread (call it on the event loop)."""
        return ThreadArtifacts(self, asyncio.get_running_loop())


class ThreadArtifacts:
    """An ``ArtifactStore`` for a worker thread: each call runs on the engine's event loop and waits
    for the answer (``timeout_s``: ``artifacts.transfer_timeout_s``)."""

    def __init__(self, store: ArtifactStore, loop: asyncio.AbstractEventLoop) -> None:
        self.store = store
        self.loop = loop
        self.timeout_s = store.config.transfer_timeout_s

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        try:
            on_loop = asyncio.get_running_loop() is self.loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            coro.close()
            raise RuntimeError("ThreadArtifacts is for worker threads; await the ArtifactStore on the event loop")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout=self.timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise ArtifactError(f"an artifact transfer took longer than {self.timeout_s:g}s") from None

    @property
    def enabled(self) -> bool:
        return self.store.enabled

    def cache_path(self, kind: str, key: str) -> Path:
        return self.store.cache_path(kind, key)

    def info(self, kind: str, key: str) -> ArtifactInfo | None:
        return self._run(self.store.info(kind, key))

    def local(self, kind: str, key: str, verify: Verifier | None = None) -> Path:
        folder = self.store.cache_path(kind, key)
        if folder.is_dir():
            return folder
        return self._run(self.store.fetch(kind, key, verify=verify))

    def fetch(self, kind: str, key: str, verify: Verifier | None = None, into: Path | None = None) -> Path:
        return self._run(self.store.fetch(kind, key, verify=verify, into=into))

    def publish(self, kind: str, key: str, folder: Path | None = None, headers: Mapping[str, str] | None = None,
                replace: bool = False) -> ArtifactInfo | None:
        return self._run(self.store.publish(kind, key, folder, headers, replace))

    def publish_soon(
        self, kind: str, key: str, folder: Path, headers: Mapping[str, str] | None = None
    ) -> concurrent.futures.Future[ArtifactInfo | None]:
        """Pack ``folder`` now (in this thread) and upload it as ``<kind>/<key>`` (replacing what is there) in
        the background; the future says when it is on the bus. Wait for one before starting the next of the
        same name, so an older upload never lands after a newer one."""
        if not self.store.enabled:
            done: concurrent.futures.Future[ArtifactInfo | None] = concurrent.futures.Future()
            done.set_result(None)
            return done
        archive, files = self.store.packed(folder)
        return self.upload_soon(kind, key, archive, files, headers)

    def upload_soon(
        self, kind: str, key: str, archive: Path, files: int, headers: Mapping[str, str] | None = None
    ) -> concurrent.futures.Future[ArtifactInfo | None]:
        """Upload a tar of a folder (``pack``; made by another process, say) as ``<kind>/<key>`` in the
        background, replacing what is there; the tar is deleted afterwards."""
        return asyncio.run_coroutine_threadsafe(self.store.upload(kind, key, archive, files, headers), self.loop)

    def delete(self, kind: str, key: str) -> bool:
        return self._run(self.store.delete(kind, key))


def find_folder(kind: str, key: str, local: Path, marker: str, artifacts: ThreadArtifacts | None,
                verify: Verifier | None = None, hint: str | Path | None = None) -> Path:
    """The folder of ``<kind>/<key>`` for a worker thread: ``local`` (the cache) when it holds ``marker``,
    else fetched from the bus and checked by ``verify``, else ``hint`` (the path an event names) when this
    machine has it there. ``ArtifactCorrupt`` when the bus's copy fails a check; ``NotFoundAnywhere``
    (saying where it looked) when there is none; ``ArtifactError`` when the bus is too slow to answer."""
    if (local / marker).is_file():
        return local
    looked = [str(local)]
    if artifacts is not None and artifacts.enabled:
        try:
            return artifacts.local(kind, key, verify)
        except ArtifactMissing:
            looked.append("the bus")
    if hint is not None:
        if (Path(hint) / marker).is_file():
            return Path(hint)
        looked.append(str(hint))
    raise NotFoundAnywhere(looked)
