"""``POST /v1/feedback`` and ``POST /v1/outcomes``: what happened to an answer, keyed by its response id.

The body is a ``feedback.given`` or ``outcome.observed`` payload (``interaction_id`` is the ``id`` the gateway
answered with), validated by the same models as every other publisher's; a bad field is a 422 naming it. The
interaction must be one the gateway served and recorded (404 or 409 otherwise), and the caller's key the one that
made it, for a session the key is given (403). Only then is the event recorded, through the same spilling
recorder as the calls; the answer is ``202`` with the new event's id.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response

from flywheel_loop.plugins.serving.gateway.access import Denied
from flywheel_loop.plugins.serving.gateway.openai_api import BadRequest, error_body, parse_json
from flywheel_loop.plugins.serving.gateway.proxy import read_body
from flywheel_loop.schemas import FeedbackGiven, OutcomeObserved, Payload, describe_validation_error

if TYPE_CHECKING:
    from flywheel_loop.plugins.serving.gateway.service import Gateway

__all__ = ["post_evidence"]

JSON = "application/json"


def _error(status: int, message: str, param: str | None = None) -> Response:
    return Response(error_body(status, message, param), status_code=status, media_type=JSON)


async def post_evidence(gw: Gateway, request: Request, kind: type[FeedbackGiven] | type[OutcomeObserved]) -> Response:
    """Validate, check ownership, record; or refuse with nothing published."""
    try:
        caller = gw.access.caller(request.headers)
        body = parse_json(await read_body(request, gw.cfg.max_body_bytes))
    except Denied as exc:
        return _error(exc.status, exc.message)
    except BadRequest as exc:
        return _error(exc.status, exc.message, exc.param)
    try:
        data: Payload = kind.model_validate(body)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        return _error(422, f"{kind.event_type}: {describe_validation_error(exc)}", param)
    interaction_id: str = data.interaction_id  # type: ignore[attr-defined]
    owner = gw.recording.owners.get(interaction_id)
    if owner is None:
        return _error(404, f"interaction_id: no interaction {interaction_id} was served through this gateway"
                           f" (in the last {gw.cfg.feedback_lookback_h:g} h)", "interaction_id")
    if not caller.may_post_for(owner.key, owner.session):
        return _error(403, f"this key may not post {kind.event_type} on interaction {interaction_id}: it was made"
                           " by another key, or for a session this key is not given", "interaction_id")
    if not owner.recorded:
        return _error(409, f"interaction {interaction_id} was not recorded (gateway.capture_rate or"
                           " gateway.exclude_patterns), so there is nothing to attach this to", "interaction_id")
    event_id = await gw.recording.recorder.record(data, correlation_id=interaction_id)
    return Response(orjson.dumps({"id": event_id, "type": kind.event_type, "interaction_id": interaction_id}),
                    status_code=202, media_type=JSON)
