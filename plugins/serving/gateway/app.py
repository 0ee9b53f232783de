"""The gateway's HTTP routes (FastAPI): the OpenAI and Anthropic APIs agents call, and feedback and outcomes.

Handlers take the raw request and answer raw bytes (orjson), not pydantic models: the hot path validates only
what routing needs and forwards the rest unchanged; the upstream is the judge of a sampling parameter.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import orjson
from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from flywheel_loop.plugins.serving.gateway.access import Denied
from flywheel_loop.plugins.serving.gateway.feedback import post_evidence
from flywheel_loop.plugins.serving.gateway.openai_api import error_body
from flywheel_loop.plugins.serving.gateway.proxy import anthropic_messages, openai_call
from flywheel_loop.schemas import FeedbackGiven, OutcomeObserved

if TYPE_CHECKING:
    from flywheel_loop.plugins.serving.gateway.service import Gateway

__all__ = ["create_app"]

JSON = "application/json"

log = logging.getLogger(__name__)


Handler = Callable[[Request], Awaitable[Response]]


class HotPaths:
    """The three call routes dispatched straight from the ASGI scope; everything else goes to the FastAPI app.

    Why: FastAPI's middleware stack, router and dependency solving cost more per call than the gateway's own work
    (measured with py-spy under ``ops/bench/gateway``), and these routes take the raw request anyway.
    """

    def __init__(self, routes: dict[tuple[str, str], Handler], app: FastAPI) -> None:
        self.routes = routes
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            handler = self.routes.get((scope["method"], scope["path"]))
            if handler is not None:
                try:
                    response = await handler(Request(scope, receive))
                except Exception as exc:  # a bug must still answer, in the API's shape
                    log.exception("gateway: %s %s failed", scope["method"], scope["path"])
                    response = Response(error_body(500, f"the gateway failed: {type(exc).__name__}: {exc}"),
                                        status_code=500, media_type=JSON)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(gw: Gateway) -> HotPaths:
    """The ASGI app serving ``gw``: the call routes on the hot path, the rest a FastAPI app."""
    app = FastAPI(title="Flywheel gateway", docs_url=None, redoc_url=None, openapi_url=None)
    started = int(time.time())

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        """An unknown path or a wrong method, in the API's error shape (clients parse ``error.message``)."""
        if exc.status_code == 404:
            message = (f"no route {request.method} {request.url.path}: the gateway serves POST /v1/chat/completions,"
                       " POST /v1/completions, POST /v1/messages, GET /v1/models, POST /v1/feedback,"
                       " POST /v1/outcomes and GET /health")
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        return Response(error_body(exc.status_code, message), status_code=exc.status_code, media_type=JSON,
                        headers=exc.headers)

    async def chat_completions(request: Request) -> Response:
        """OpenAI chat completions, streamed or whole; ``model`` is a role, a version or an upstream."""
        return await openai_call(gw, request, chat=True)

    async def completions(request: Request) -> Response:
        """OpenAI (legacy) completions."""
        return await openai_call(gw, request, chat=False)

    async def messages(request: Request) -> Response:
        """Anthropic Messages, streamed or whole."""
        return await anthropic_messages(gw, request)

    hot: dict[tuple[str, str], Handler] = {}
    for path, handler in (("/v1/chat/completions", chat_completions), ("/v1/completions", completions),
                          ("/v1/messages", messages)):
        hot[("POST", path)] = hot[("POST", path + "/")] = handler
        app.add_api_route(path, handler, methods=["POST"])  # reached only through a mount or a test client

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        """Every name a request may ask for: roles, versions being served, configured upstreams."""
        try:
            gw.access.caller(request.headers)
        except Denied as exc:
            return Response(error_body(exc.status, exc.message), status_code=exc.status, media_type=JSON)
        data = [{"id": name, "object": "model", "created": started, "owned_by": "flywheel"}
                for name in gw.router.models()]
        return Response(orjson.dumps({"object": "list", "data": data}), media_type=JSON)

    @app.post("/v1/feedback")
    async def feedback(request: Request) -> Response:
        """A ``feedback.given`` body about an interaction (``interaction_id`` = the response id)."""
        return await post_evidence(gw, request, FeedbackGiven)

    @app.post("/v1/outcomes")
    async def outcomes(request: Request) -> Response:
        """An ``outcome.observed`` body about an interaction (``interaction_id`` = the response id)."""
        return await post_evidence(gw, request, OutcomeObserved)

    @app.get("/health")
    async def health() -> Response:
        """Liveness, and whether the bus is reachable (records spill to disk while it is not)."""
        body = {"status": "ok", "bus": gw.recorder.connected, "calls": gw.recording.calls,
                "captured": gw.recording.captured, "pending_records": gw.recorder.pending,
                "spilled_records": gw.recorder.spilled, "deployments_position": gw.table.position}
        return Response(orjson.dumps(body), media_type=JSON)

    return HotPaths(hot, app)
