"""Talking to upstreams: one pooled, kept-alive aiohttp client for every OpenAI-compatible server.

Why aiohttp rather than httpx: the gateway adds one upstream round trip to every call, and on 2 cores the client's
own cost per request is most of the gateway's overhead; aiohttp's C HTTP parser and connection pool cost less per
request than httpx's pure-Python stack (see ``ops/bench/gateway``).

A failure to reach an upstream, a reset or a timeout raises ``UpstreamError`` with the status the gateway answers
(502 unreachable or broken, 504 timed out) and a message naming the upstream (version and URL).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiohttp

from flywheel_loop.plugins.serving.gateway.routing import Target

__all__ = ["Upstreams", "UpstreamError", "UpstreamReply"]


class UpstreamError(Exception):
    """An upstream that could not be reached or broke off; ``status`` is what the gateway answers."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class UpstreamReply:
    """An upstream's answer whose body is read by the caller (all at once or line by line)."""

    status: int
    content_type: str
    response: aiohttp.ClientResponse

    async def body(self) -> bytes:
        data: bytes = await self.response.read()
        return data

    async def lines(self) -> AsyncIterator[bytes]:
        """The body's lines (server-sent events), as they arrive."""
        async for line in self.response.content:
            yield line


def describe(target: Target) -> str:
    return f"upstream {target.served_version} at {target.base_url}"


class Upstreams:
    """The pooled client; ``start`` inside the serving loop, ``close`` when the gateway stops."""

    def __init__(self, max_connections: int, connect_timeout_s: float, request_timeout_s: float) -> None:
        self.max_connections = max_connections
        self.timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout_s, sock_read=request_timeout_s)
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=self.max_connections, limit_per_host=0, keepalive_timeout=30,
                                         ttl_dns_cache=300)
        # skip_auto_headers: no Accept-Encoding, so an upstream never compresses what the gateway parses
        self.session = aiohttp.ClientSession(connector=connector, timeout=self.timeout,
                                             skip_auto_headers=("User-Agent", "Accept-Encoding"))

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    @asynccontextmanager
    async def post(self, target: Target, path: str, body: bytes) -> AsyncIterator[UpstreamReply]:
        """POST ``body`` (JSON) to ``<target.base_url><path>``; the reply is open inside the block."""
        assert self.session is not None, "Upstreams.start() was not called"
        headers = {"Content-Type": "application/json"}
        if target.api_key:
            headers["Authorization"] = f"Bearer {target.api_key}"
        response = await self._send(target, target.base_url + path, body, headers)
        try:
            yield UpstreamReply(response.status, response.headers.get("Content-Type", ""), response)
        except TimeoutError as exc:
            raise UpstreamError(504, f"{describe(target)} did not answer in time ({exc or 'timeout'})") from None
        except (aiohttp.ClientError, ConnectionError, asyncio.IncompleteReadError) as exc:
            raise UpstreamError(502, f"{describe(target)} broke off: {type(exc).__name__}: {exc}") from None
        finally:
            response.release()

    async def _send(self, target: Target, url: str, body: bytes, headers: dict[str, str]) -> aiohttp.ClientResponse:
        assert self.session is not None
        for attempt in (1, 2):
            try:
                return await self.session.post(url, data=body, headers=headers)
            except TimeoutError as exc:
                raise UpstreamError(504, f"{describe(target)} did not answer in time ({exc or 'timeout'})") from None
            except aiohttp.ClientConnectorError as exc:
                raise UpstreamError(502, f"{describe(target)} is unreachable: {exc.os_error or exc}") from None
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                # A kept-alive connection the upstream closed (or a restarted upstream) fails before any answer:
                # one more try on a fresh connection tells that apart from an upstream that is gone.
                if attempt == 1:
                    continue
                raise UpstreamError(502, f"{describe(target)} is unreachable: {type(exc).__name__}: {exc}") from None
            except (aiohttp.ClientError, ConnectionError) as exc:
                raise UpstreamError(502, f"{describe(target)} broke off: {type(exc).__name__}: {exc}") from None
        raise AssertionError("unreachable")
