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


#: every pair of characters, by the 10 bits it encodes: ids are made two characters at a time
_PAIRS = [a + b for a in _ALPHABET for b in _ALPHABET]


def _encode(value: int, length: int) -> str:
    """The low ``5 * length`` bits of ``value`` in Crockford base32, most significant first."""
    chars = []
    for _ in range(length):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def _encode50(v: int) -> str:
    """``_encode(v, 10)``, unrolled: every event the SDK records and every output the engine derives
    makes an id, and the loop above was most of what that cost."""
    p = _PAIRS
    return p[(v >> 40) & 1023] + p[(v >> 30) & 1023] + p[(v >> 20) & 1023] + p[(v >> 10) & 1023] + p[v & 1023]


def _encode80(v: int) -> str:
    """``_encode(v, 16)``, unrolled (see ``_encode50``)."""
    p = _PAIRS
    return (p[(v >> 70) & 1023] + p[(v >> 60) & 1023] + p[(v >> 50) & 1023] + p[(v >> 40) & 1023]
            + p[(v >> 30) & 1023] + p[(v >> 20) & 1023] + p[(v >> 10) & 1023] + p[v & 1023])


def new_id(now_ms: int | None = None) -> str:
    """A fresh, time-ordered, unique id."""
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    rand = int.from_bytes(os.urandom(10), "big")
    return _encode50(ms) + _encode80(rand)


def derive_id(parent_id: str, *parts: str | int) -> str:
    """A deterministic id for an event produced from ``parent_id`` by ``parts``.

    It keeps the parent's time prefix (so it sorts next to its cause) and replaces the
    random part with a hash of the parent id and the parts.
    """
    digest = hashlib.blake2b("\x1f".join([parent_id, *map(str, parts)]).encode(), digest_size=10)
    return parent_id[:10] + _encode80(int.from_bytes(digest.digest(), "big"))


def id_time_ms(event_id: str) -> int:
    """The millisecond timestamp encoded in an id."""
    value = 0
    for ch in event_id[:10]:
        value = value * 32 + _ALPHABET.index(ch)
    return value
