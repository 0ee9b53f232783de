"""Event ids: ULIDs (48-bit millisecond time + 80 random bits, Crockford base32).

They sort by creation time, are unique without coordination, and a derived id is a pure
function of its inputs, so a redelivered input produces the same output id and JetStream's
duplicate window drops the second copy.
"""

from __future__ import annotations

import hashlib
import os
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
ID_PATTERN = r"^[0-9A-HJKMNP-TV-Z]{26}$"


def _encode(value: int, length: int) -> str:
    chars = []
    for _ in range(length):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def new_id(now_ms: int | None = None) -> str:
    """A fresh, time-ordered, unique id."""
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    rand = int.from_bytes(os.urandom(10), "big")
    return _encode(ms, 10) + _encode(rand, 16)


def derive_id(parent_id: str, *parts: str | int) -> str:
    """A deterministic id for an event produced from ``parent_id`` by ``parts``.

    It keeps the parent's time prefix (so it sorts next to its cause) and replaces the
    random part with a hash of the parent id and the parts.
    """
    digest = hashlib.blake2b("\x1f".join([parent_id, *map(str, parts)]).encode(), digest_size=10)
    return parent_id[:10] + _encode(int.from_bytes(digest.digest(), "big"), 16)


def id_time_ms(event_id: str) -> int:
    """The millisecond timestamp encoded in an id."""
    value = 0
    for ch in event_id[:10]:
        value = value * 32 + _ALPHABET.index(ch)
    return value
