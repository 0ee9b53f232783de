"""The OpenAI-compatible HTTP both local servers speak.

Standard library only, so the llama.cpp server process can import it without the engine's
dependencies. ``OpenAIHandler`` answers ``GET /v1/models`` and ``GET /health`` for the one model a
server serves, sends JSON bodies, OpenAI-shaped errors and server-sent event streams (chunked, so the
connection is kept alive), and reads a request body (a JSON object naming that model, or none); each
server adds its own ``POST`` routes. Clients use ``plugins/shared/openai_client.py``.
"""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler
from typing import Any

__all__ = ["BadRequest", "OpenAIHandler"]


class BadRequest(ValueError):
    """The request cannot be served; answered with 400 and the message."""


class OpenAIHandler(BaseHTTPRequestHandler):
    """Shared routes and replies of a server for one model; subclasses set ``model_name`` and
    ``created`` (Unix seconds) and add ``do_POST``."""

    protocol_version = "HTTP/1.1"
    model_name: str = ""
    created: int = 0

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        self._send(status, {"error": {"message": message, "type": kind, "code": status}})

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path.rstrip("/") == "/v1/models":
            model = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "flywheel"}
            self._send(200, {"object": "list", "data": [model]})
        elif self.path.rstrip("/") == "/health":
            self._send(200, {"status": "ok", "model": self.model_name})
        else:
            self._error(404, f"no route GET {self.path}; try /v1/models")

    def _read_request(self) -> dict[str, Any] | None:
        """The request's JSON object; None when it names another model (already answered with 404).
        Raises ``BadRequest`` or ``json.JSONDecodeError`` for a body that is no JSON object."""
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"null")
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        if body.get("model") not in (None, self.model_name):
            self._error(404, f"model {body['model']!r} is not served here; this server serves {self.model_name!r}",
                        "model_not_found")
            return None
        return body

    # ------------------------------------------------------------------ streaming (server-sent events)

    def _start_stream(self) -> None:
        """Begin a ``text/event-stream`` answer, chunked so the connection stays usable after it."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _send_event(self, data: dict[str, Any] | str) -> None:
        """One ``data:`` event (a JSON object, or ``[DONE]``), flushed at once."""
        payload = b"data: " + (data.encode() if isinstance(data, str) else json.dumps(data).encode()) + b"\n\n"
        self.wfile.write(f"{len(payload):x}\r\n".encode() + payload + b"\r\n")
        self.wfile.flush()

    def _end_stream(self) -> None:
        self._send_event("[DONE]")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()
