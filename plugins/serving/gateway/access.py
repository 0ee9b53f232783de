"""API keys: who may call which role, and post feedback on which interactions.

Keys are configured by their SHA-256 (``[[gateway.keys]]``), never in clear; a request's key (``Authorization:
Bearer``, as the OpenAI clients send it, or ``x-api-key``, as the Anthropic clients do) is hashed and looked up.
With no key configured the gateway is open but listens on loopback only.
"""

from __future__ import annotations

import fnmatch
import hashlib
import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from flywheel_loop.plugins.serving.gateway.settings import GatewayConfig, GatewayKey

__all__ = ["Access", "Caller", "Denied", "bind_host", "hash_key"]

LOOPBACK = "127.0.0.1"


class Denied(Exception):
    """A request without a valid key (401) or beyond what its key allows (403)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Caller:
    """Who is calling: a key's name and rights, or nobody in particular on an open (loopback) gateway."""

    key: str | None
    roles: tuple[str, ...] = ("*",)
    sessions: tuple[str, ...] = ("*",)

    def may_call(self, role: str) -> bool:
        return "*" in self.roles or role in self.roles

    def may_post_for(self, owner: str | None, session: str) -> bool:
        """Feedback on an interaction: only the key that made it, and only for sessions the key is given."""
        if owner != self.key:
            return False
        return any(fnmatch.fnmatchcase(session, pattern) for pattern in self.sessions)


def hash_key(key: str) -> str:
    """The hex SHA-256 a key is configured by."""
    return hashlib.sha256(key.encode()).hexdigest()


class Access:
    """The configured keys, by hash."""

    def __init__(self, keys: list[GatewayKey]) -> None:
        self.by_hash = {k.sha256: Caller(k.name, tuple(k.roles), tuple(k.sessions)) for k in keys}

    @property
    def open(self) -> bool:
        return not self.by_hash

    def caller(self, headers: Mapping[str, str]) -> Caller:
        """The caller of a request, from its headers; ``Denied`` (401) without a known key."""
        if self.open:
            return Caller(None)
        key = headers.get("x-api-key")
        if key is None:
            auth = headers.get("authorization", "")
            scheme, _, value = auth.partition(" ")
            key = value.strip() if scheme.lower() == "bearer" else None
        if not key:
            raise Denied(401, "no API key: send Authorization: Bearer <key> or x-api-key: <key>")
        caller = self.by_hash.get(hash_key(key))
        if caller is None:
            raise Denied(401, "unknown API key")
        return caller


def bind_host(cfg: GatewayConfig, warn: Callable[[str], object]) -> str:
    """Where to listen: the configured host, but only a loopback one while no key is configured."""
    if cfg.keys or _is_loopback(cfg.host):
        return cfg.host
    warn(
        f"warning: gateway.host = {cfg.host!r} but no gateway.keys are configured: the gateway listens on"
        f" {LOOPBACK} only (anyone who can reach it could call every model and post feedback)"
    )
    return LOOPBACK


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
