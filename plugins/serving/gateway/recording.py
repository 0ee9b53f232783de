"""Every call becomes an ``interaction.recorded``, without ever failing or slowing the call.

``Recording`` decides whether a call is captured (``gateway.capture_rate`` by a hash of the session, so a session
is recorded whole or not at all; ``gateway.exclude_patterns`` on the prompt), builds the event once the answer is
complete (after the reply left, off the response path), and hands it to a ``SpillingRecorder``: in memory while
the bus is slow, on disk while it is down, published when it is back; the id given at record time is the event id
and the ``Nats-Msg-Id``, so nothing is lost and nothing stored twice. It also keeps who made each recent
interaction (``Owners``), which the feedback and outcome endpoints check.
"""

from __future__ import annotations

import collections
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson
from pydantic import ValidationError

from flywheel_loop.plugins.serving.gateway.routing import Target, session_bucket
from flywheel_loop.plugins.serving.gateway.settings import GatewayConfig
from flywheel_loop.schemas import MAX_EVENT_BYTES, Event, GatewayCall, InteractionRecorded, new_event, new_id
from flywheel_loop.sdk.recorder import SpillingRecorder

__all__ = ["Call", "Owner", "Owners", "Recording"]

log = logging.getLogger(__name__)

TEXT_MAX = 200_000
NAME_MAX = 200
COMPLEXITIES = ("simple", "moderate", "complex", "expert")
#: request headers an agent may describe its task with; recorded as the interaction's context
ABOUT_HEADERS = {"x-flywheel-language": "language", "x-flywheel-project": "project",
                 "x-flywheel-domain": "domain", "x-flywheel-complexity": "complexity"}


class Owner(NamedTuple):
    """Who made an interaction, and whether it was recorded. (A tuple of strings: the garbage collector stops
    tracking it, so a million of them cost a full collection nothing.)"""

    key: str | None
    session: str
    recorded: bool


class Owners:
    """Interaction id -> owner, for the most recent ``capacity`` interactions (oldest forgotten first)."""

    def __init__(self, capacity: int = 1_000_000) -> None:
        self.capacity = capacity
        self._by_id: collections.OrderedDict[str, Owner] = collections.OrderedDict()

    def add(self, interaction_id: str, owner: Owner) -> None:
        self._by_id[interaction_id] = owner
        if len(self._by_id) > self.capacity:
            self._by_id.popitem(last=False)

    def get(self, interaction_id: str) -> Owner | None:
        return self._by_id.get(interaction_id)

    def __len__(self) -> int:
        return len(self._by_id)


@dataclass
class Call:
    """One call through the gateway, filled in as it goes."""

    api: str
    target: Target
    session: str
    key: str | None
    stream: bool
    prompt: str
    context: dict[str, Any] | None = None
    user: str | None = None
    prompt_variant: str | None = None
    #: what the agent said about the task in ``x-flywheel-*`` headers (language, project, domain, complexity)
    about: dict[str, str] = field(default_factory=dict)
    id: str = field(default_factory=new_id)
    started: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    output: str = ""
    tool_calls: list[dict[str, str]] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    status: str = "ok"
    http_status: int | None = None
    error: str | None = None


def _cut(text: str, limit: int = TEXT_MAX) -> str:
    return text if len(text) <= limit else text[:limit]


class Recording:
    """Capture decisions, the event for a finished call, and the recorder that publishes it."""

    def __init__(self, cfg: GatewayConfig, recorder: SpillingRecorder) -> None:
        self.cfg = cfg
        self.recorder = recorder
        self.excludes = [re.compile(p) for p in cfg.exclude_patterns]
        self.owners = Owners()
        #: calls forwarded, and of them those recorded (captured), since the gateway started
        self.calls = 0
        self.captured = 0
        self.failures = 0

    def captures(self, session: str, prompt: str) -> bool:
        if self.cfg.capture_rate < 1.0 and session_bucket("capture", session) >= self.cfg.capture_rate:
            return False
        return not any(p.search(prompt) for p in self.excludes)

    def begin(self, call: Call) -> bool:
        """Note who owns ``call.id``; return whether the call will be recorded."""
        recorded = self.captures(call.session, call.prompt)
        self.owners.add(call.id, Owner(call.key, call.session, recorded))
        self.calls += 1
        self.captured += recorded
        return recorded

    def finish(self, call: Call) -> None:
        """Record a finished (or failed) call; never raises."""
        try:
            event = self.event(call)
            self.recorder.enqueue(event)
        except Exception:  # recording must never break a call; the reason is in the log
            self.failures += 1
            log.exception("could not record call %s", call.id)

    def event(self, call: Call) -> Event[Any]:
        now = time.perf_counter()
        target = call.target
        ttft = (call.first_token - call.started) * 1000 if call.first_token is not None else None
        gateway = GatewayCall(
            served_version=target.served_version, requested=_cut(target.requested, NAME_MAX),
            upstream=_cut(target.base_url, 2000), api=call.api,  # type: ignore[arg-type]
            stream=call.stream, status=call.status,  # type: ignore[arg-type]
            http_status=call.http_status, error=_cut(call.error, 2000) if call.error else None,
            ttft_ms=round(ttft, 3) if ttft is not None else None, canary=target.canary, key=call.key,
        )
        context: dict[str, Any] = {k: _cut(v, 2000) for k, v in call.about.items() if k in ("language", "project")}
        if call.context:
            context["extra"] = _cut(orjson.dumps(call.context).decode())
        fields: dict[str, Any] = dict(
            session_id=_cut(call.session, NAME_MAX), role=target.role, model_id=target.served_version,
            prompt_variant=call.prompt_variant, input=_cut(call.prompt), output=_cut(call.output),
            context=context, duration_ms=round((now - call.started) * 1000, 3),
            tokens={"prompt": call.prompt_tokens, "completion": call.completion_tokens}, gateway=gateway,
            tool_calls=[{"name": _cut(c["name"] or "(unnamed)", NAME_MAX), "arguments": _cut(c["arguments"])}
                        for c in call.tool_calls[:500]],
        )
        if call.user:
            fields["user_id"] = _cut(call.user, NAME_MAX)
        if call.about.get("domain"):
            fields["domain"] = _cut(call.about["domain"], NAME_MAX)
        if call.about.get("complexity") in COMPLEXITIES:
            fields["complexity"] = call.about["complexity"]
        try:
            data = InteractionRecorded(**fields)
        except ValidationError as exc:
            # e.g. a domain header no name fits: keep the call, drop what the agent added that does not fit
            log.warning("call %s: recording without context: %s", call.id, exc.errors(include_url=False)[:2])
            fields["context"] = {}
            fields.pop("domain", None)
            fields["session_id"] = fields["session_id"] or call.id
            data = InteractionRecorded(**fields)
        event = new_event(data, source="gateway", event_id=call.id)
        if len(event.to_bytes()) > MAX_EVENT_BYTES:  # long multibyte text: keep the answer, shorten the rest
            fields.update(context={}, input=_cut(call.prompt, 50_000), output=_cut(call.output, 100_000))
            event = new_event(InteractionRecorded(**fields), source="gateway", event_id=call.id)
        return event
