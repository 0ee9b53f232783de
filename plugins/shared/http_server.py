"""An ASGI app served by uvicorn inside an asyncio loop the caller owns (``flywheel up``'s): the web
dashboard and the gateway.

The socket is bound before uvicorn starts, so a port in use is a clear ``CannotListen`` naming the
settings to change (uvicorn itself would exit the process), and port 0 gives a free port whose URL is
known at once. Signals stay with the host: uvicorn's own handlers are not installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator
from typing import Any

import uvicorn

__all__ = ["CannotListen", "HostedServer"]

log = logging.getLogger(__name__)


class CannotListen(RuntimeError):
    """The server cannot listen where the configuration says."""


class _Uvicorn(uvicorn.Server):
    """A uvicorn server that leaves signal handling to the process hosting it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HostedServer:
    """``app`` on ``host:port`` until ``stop``; ``section`` is the settings table that configures it (named
    in errors). ``options`` go to ``uvicorn.Config``."""

    def __init__(self, app: Any, host: str, port: int, section: str, backlog: int = 128, **options: Any) -> None:
        self.app, self.host, self.port, self.section, self.backlog = app, host, port, section, backlog
        self.options = {"log_level": "warning", "lifespan": "off", "access_log": False, **options}
        self._socket: socket.socket | None = None
        self._server: _Uvicorn | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def base_url(self) -> str:
        """``http://host:port`` of the bound socket."""
        if self._socket is None:
            raise RuntimeError(f"the {self.section} is not started")
        host, port = self._socket.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}"

    def bind(self) -> None:
        """Bind the socket now (``start`` does when it is not bound): a taken port fails before anything else starts."""
        if self._socket is None:
            self._socket = self._bind()

    def _bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise CannotListen(
                f"{self.section} cannot listen on {self.host}:{self.port} ({exc.strerror or exc}); set"
                f" {self.section}.port to a free port (0 picks one) or {self.section}.enabled = false"
            ) from None
        sock.listen(self.backlog)
        sock.setblocking(False)
        return sock

    async def start(self) -> str:
        """Bind, serve in the background, and return the base URL once it answers."""
        self.bind()
        assert self._socket is not None
        self._server = _Uvicorn(uvicorn.Config(self.app, backlog=self.backlog, **self.options))
        self._task = asyncio.create_task(self._server.serve(sockets=[self._socket]), name=self.section)
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise CannotListen(f"the {self.section} stopped while starting")
            await asyncio.sleep(0.02)
        return self.base_url

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Stop accepting connections and wait (up to ``timeout_s``) for the calls in flight to end."""
        if self._server is not None:
            self._server.should_exit = True
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout_s)
            except (TimeoutError, asyncio.CancelledError):
                log.warning("the %s did not stop within %.0f s", self.section, timeout_s)
            self._task = None
