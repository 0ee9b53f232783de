"""Crypto-shredding: the engine seals personal text when it publishes to the log and opens it when it reads.

Which fields are personal, and whose key seals them, the schemas say (``schemas/personal.py``: fields
typed ``PERSONAL``, ``Payload.data_subject``). The engine does the rest, so a plugin never sees a key or a
ciphertext:

- **Sealing** (``KeyRing.seal_many``, called by ``Bus`` for every event it publishes): a log event with
  personal values has them taken out of its payload (the fields hold blanks) and encrypted with AES-256-GCM
  under its data subject's key (created on first use in the key store, ``engine/keys.py``), with a random
  96-bit nonce and the event's id and type as associated data; the ciphertext travels in the envelope's
  ``sealed``. Intake on the raw stream is not sealed: it is erased message by message instead.
- **Opening** (``KeyRing.open_many``: the worker, the projections and ``Bus.read_log``): a sealed event whose
  key exists comes back whole, exactly as it was before sealing. One whose key was destroyed comes back
  with its blanks and ``event.forgotten`` set: processors are not called with it, projections and log readers
  see only what was never personal (its role, its counts, its keyed hashes).
- **Destroying** (``KeyRing.destroy``, by ``flywheel forget``): the subject's keys are erased from the store
  and from this process's memory; other processes drop a cached key when they read the ``data.forgotten``
  that announces it, and after ``keys.cache_s`` in any case.

Why a random nonce: nothing derived depends on the ciphertext. Event ids are derived from the input's id,
dataset and adapter hashes from the plaintext rows, projections fold the opened payloads, so a replay
rebuilds the same bytes whatever the nonces were; a redelivered input is answered without publishing its
outputs again (``engine/worker.py``), so the log never holds two sealings of one event. A nonce derived
from the content would instead repeat under one key whenever a step ran twice with different output,
which breaks GCM.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from flywheel_loop.engine.keys import KeyStore, KeyStoreError, SubjectForgotten, valid_key_id
from flywheel_loop.schemas import DataForgotten, Event, InvalidEvent, parse_event
from flywheel_loop.schemas.personal import Sealed, personal_paths, restore, subject_of, withhold

__all__ = ["KeyMissing", "KeyRing", "Opened", "sealable"]

log = logging.getLogger(__name__)

NONCE_BYTES = 12
#: what one process keeps in memory at most
CACHE_SIZE = 200_000

#: an opened message: the event, or why it is not one
Opened = Event[Any] | InvalidEvent


class KeyMissing(KeyStoreError):
    """A sealed event names a key the store never had: the store is not the one the log was sealed with."""


def sealable(event: Event[Any]) -> bool:
    """Whether ``event`` is sealed on publishing: a log event whose payload has personal fields."""
    cls = type(event.data)
    return cls.stream == "log" and bool(personal_paths(cls)) and event.sealed is None


def _associated(event_id: str, event_type: str) -> bytes:
    return f"{event_id}\x1f{event_type}".encode()


class KeyRing:
    """The engine's keys: a store, and a bounded cache of what it answered."""

    def __init__(self, store: KeyStore, cache_s: float = 60.0) -> None:
        self.store = store
        self.cache_s = cache_s
        # key id -> (key bytes or None once destroyed, when fetched); destroyed keys never come back
        self._cache: collections.OrderedDict[str, tuple[bytes | None, float]] = collections.OrderedDict()
        self._ciphers: dict[bytes, AESGCM] = {}  # a key's cipher, made once

    # ------------------------------------------------------------------ the cache

    def _cached(self, key_id: str) -> tuple[bool, bytes | None]:
        """(known, the key or None when destroyed); not known when not cached, or cached too long ago."""
        hit = self._cache.get(key_id)
        if hit is None:
            return False, None
        key, at = hit
        if key is not None and self.cache_s and time.monotonic() - at > self.cache_s:
            return False, None
        self._cache.move_to_end(key_id)
        return True, key

    def _remember(self, key_id: str, key: bytes | None) -> None:
        self._cache[key_id] = (key, time.monotonic())
        self._cache.move_to_end(key_id)
        while len(self._cache) > CACHE_SIZE:
            _, (old, _) = self._cache.popitem(last=False)
            if old is not None:
                self._ciphers.pop(old, None)

    def _cipher(self, key: bytes) -> AESGCM:
        cipher = self._ciphers.get(key)
        if cipher is None:
            cipher = self._ciphers[key] = AESGCM(key)
        return cipher

    def forget_cached(self, key_ids: Sequence[str]) -> None:
        """Treat these keys as destroyed in this process (their ``data.forgotten`` was read)."""
        for key_id in key_ids:
            hit = self._cache.get(key_id)
            if hit is not None:
                if hit[0] is not None:
                    self._ciphers.pop(hit[0], None)
                self._remember(key_id, None)

    # ------------------------------------------------------------------ sealing

    async def writable(self, events: Sequence[Event[Any]]) -> list[Event[Any]]:
        """``events`` without those whose data subject was forgotten (each dropped one is logged), with the
        keys of the others created or fetched now, so that sealing them needs no more round trips."""
        subjects = await self._keys_of(events)
        kept = []
        for event, subject in zip(events, subjects, strict=True):
            if subject is not None and self._cached(subject) == (True, None):
                log.info("%s %s is about forgotten data subject %s: not published", event.type, event.id, subject)
                continue
            kept.append(event)
        return kept

    async def _keys_of(self, events: Sequence[Event[Any]]) -> list[str | None]:
        """The data subject whose key seals each event (None: not sealed), with the keys not in memory created
        or fetched in one round (create, or take the key another process made first)."""
        subjects = [subject_of(e.data) if sealable(e) else None for e in events]
        missing = sorted({k for k in subjects if k is not None and not self._cached(k)[0]})
        if missing:
            for key_id, key in (await self.store.create_many(missing)).items():
                self._remember(key_id, key)
        return subjects

    async def _key_for_writing(self, key_id: str) -> bytes:
        known, key = self._cached(key_id)
        if not known:
            key = await self.store.create(key_id)
            self._remember(key_id, key)
        if key is None:
            raise SubjectForgotten(key_id)
        return key

    async def seal(self, event: Event[Any]) -> bytes:
        """The wire bytes of ``event``: its personal values sealed under its data subject's key (log events
        with personal fields), or its plain form. ``SubjectForgotten`` when that subject was forgotten."""
        if not sealable(event):
            return event.to_bytes()
        return await self._seal(event, subject_of(event.data))

    async def _seal(self, event: Event[Any], subject: str | None) -> bytes:
        """``seal`` of a sealable event whose data subject is known."""
        cls = type(event.data)
        if subject is None:
            raise KeyStoreError(f"{event.type} names no data subject ({cls.__name__}.data_subject is empty)")
        # the wire form (as Event.to_bytes writes it), with the values taken out and the ciphertext added
        wire = event.model_dump(mode="python", exclude={"sealed"})
        taken = withhold(wire["data"], personal_paths(cls))
        if not taken:
            return orjson.dumps(wire)  # nothing personal in it: nothing to seal
        key = await self._key_for_writing(subject)
        nonce = os.urandom(NONCE_BYTES)
        ciphertext = self._cipher(key).encrypt(nonce, orjson.dumps(taken), _associated(event.id, event.type))
        wire["sealed"] = Sealed(key=subject, nonce=Sealed.encode(nonce),
                                ciphertext=Sealed.encode(ciphertext)).model_dump()
        return orjson.dumps(wire)

    async def seal_many(self, events: Sequence[Event[Any]]) -> list[bytes]:
        subjects = await self._keys_of(events)  # create or fetch the keys at once
        return [
            event.to_bytes() if not sealable(event) else await self._seal(event, subject)
            for event, subject in zip(events, subjects, strict=True)
        ]

    # ------------------------------------------------------------------ opening

    async def open_many(self, raws: Sequence[bytes]) -> list[Opened]:
        """Parse and open each message: the whole event, the event with ``forgotten`` set when its key was
        destroyed, or the ``InvalidEvent`` saying why it is not one. ``KeyStoreUnavailable`` when keys are
        needed and the store does not answer; ``KeyMissing`` when a key was never in the store."""
        wires: list[dict[str, Any] | None] = [_sealed_wire(raw) for raw in raws]
        needed = {w["sealed"]["key"] for w in wires if w is not None}
        missing = [k for k in needed if not self._cached(k)[0]]
        if missing:
            fetched = await self.store.fetch(missing)
            for key_id, key in fetched.items():
                self._remember(key_id, key)
            never = sorted(set(missing) - set(fetched))
            if never:
                raise KeyMissing(
                    f"{len(never)} sealed event(s) name keys that {self.store.where} never held (e.g. {never[0]}):"
                    " is it the key store this log was sealed with? (keys.store, keys.folder, streams.prefix)"
                )

        def read(raw: bytes, i: int) -> Event[Any]:
            wire = wires[i]
            return parse_event(raw) if wire is None else self._open(raw, wire)

        return self._each(raws, read)

    def as_stored(self, raws: Sequence[bytes]) -> list[Opened]:
        """Parse each message without opening it: a sealed event keeps its blanks and ``sealed`` (``forgotten``
        reads True), so no key is fetched and nothing decrypted. For readers that use no personal field (a
        projection with ``personal = False``); a ``data.forgotten`` among them still drops its keys here."""
        return self._each(raws, lambda raw, _: parse_event(raw))

    def _each(self, raws: Sequence[bytes], read: Callable[[bytes, int], Event[Any]]) -> list[Opened]:
        """``read`` each message in order: an invalid one is kept as its ``InvalidEvent``, and a
        ``data.forgotten`` drops the cached keys it names."""
        out: list[Opened] = []
        for i, raw in enumerate(raws):
            try:
                event = read(raw, i)
            except InvalidEvent as exc:
                out.append(exc)
                continue
            if isinstance(event.data, DataForgotten):
                self.forget_cached(event.data.interaction_ids)
            out.append(event)
        return out

    async def open(self, raw: bytes) -> Event[Any]:
        """One message, opened (see ``open_many``); ``InvalidEvent`` when it is not a valid event."""
        [item] = await self.open_many([raw])
        if isinstance(item, InvalidEvent):
            raise item
        return item

    def _open(self, raw: bytes, wire: dict[str, Any]) -> Event[Any]:
        """The event of a sealed message: whole when its key exists, else as stored (blanks, ``forgotten``)."""
        sealed = wire["sealed"]
        _, key = self._cached(sealed["key"])
        if key is None:
            return parse_event(raw)  # destroyed: the subject is forgotten; its blanks stay
        try:
            plain = self._cipher(key).decrypt(Sealed.decode(sealed["nonce"]), Sealed.decode(sealed["ciphertext"]),
                                              _associated(str(wire.get("id")), str(wire.get("type"))))
            restore(wire["data"], orjson.loads(plain))
        except (InvalidTag, ValueError, TypeError, KeyError, IndexError) as exc:
            raise InvalidEvent(
                f"sealed: the personal fields do not open with their key ({type(exc).__name__})") from None
        del wire["sealed"]
        return parse_event(wire)

    # ------------------------------------------------------------------ destroying

    async def destroy(self, key_ids: Sequence[str]) -> int:
        """Destroy these keys in the store and in memory; return how many held key bytes."""
        self.forget_cached(key_ids)
        for key_id in key_ids:
            self._remember(key_id, None)
        return await self.store.destroy(key_ids)

    async def live(self, key_ids: Sequence[str]) -> list[str]:
        """Those of ``key_ids`` whose keys exist in the store (not destroyed)."""
        fetched = await self.store.fetch(key_ids)
        return [k for k in key_ids if fetched.get(k) is not None]


def _sealed_wire(raw: bytes) -> dict[str, Any] | None:
    """The decoded message when it is a sealed event (a top-level ``sealed`` with a key), else None."""
    if b'"sealed":' not in raw:
        return None
    try:
        decoded = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(decoded, dict):
        return None
    wire: dict[str, Any] = decoded
    sealed = wire.get("sealed")
    if not (isinstance(sealed, dict) and isinstance(sealed.get("key"), str) and valid_key_id(sealed["key"])
            and isinstance(sealed.get("nonce"), str) and isinstance(sealed.get("ciphertext"), str)
            and isinstance(wire.get("data"), dict)):
        return None  # not a sealed event: parse_event says what is wrong, if anything
    return wire
