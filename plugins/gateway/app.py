"""The gateway's HTTP routes (FastAPI): the OpenAI and Anthropic APIs agents call, and feedback and outcomes.

Handlers take the raw request and answer raw bytes (orjson), not pydantic models: the hot path validates only
what routing needs and forwards the rest unchanged; the upstream is the judge of a sampling parameter.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import orjson
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response

from plugins.gateway.access import Denied
from plugins.gateway.feedback import post_evidence
from plugins.gateway.openai_api import error_body
from plugins.gateway.proxy import anthropic_messages, openai_call
from schemas import FeedbackGiven, OutcomeObserved

if TYPE_CHECKING:
    from plugins.gateway.service import Gateway

__all__ = ["create_app"]

JSON = "application/json"


def create_app(gw: Gateway) -> FastAPI:
    """The ASGI app serving ``gw``."""
    app = FastAPI(title="Flywheel gateway", docs_url=None, redoc_url=None, openapi_url=None)
    started = int(time.time())

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        """OpenAI chat completions, streamed or whole; ``model`` is a role, a version or an upstream."""
        return await openai_call(gw, request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        """OpenAI (legacy) completions."""
        return await openai_call(gw, request, chat=False)

    @app.post("/v1/messages")
    async def messages(request: Request) -> Response:
        """Anthropic Messages, streamed or whole."""
        return await anthropic_messages(gw, request)

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
        body = {"status": "ok", "bus": gw.recorder.connected, "pending_records": gw.recorder.pending,
                "spilled_records": gw.recorder.spilled, "deployments_position": gw.table.position}
        return Response(orjson.dumps(body), media_type=JSON)

    return app
