"""The gateway's settings section, ``[gateway]`` in ``flywheel.toml`` (registered by the serving feature)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, SecretStr, field_validator

from flywheel_loop.engine.config import PluginSection, Section
from flywheel_loop.plugins.serving.settings import HttpBase

__all__ = ["SESSION_SOURCES", "GatewayConfig", "GatewayKey", "GatewayRole", "GatewayUpstream", "SessionSource"]


class GatewayUpstream(Section):
    """An OpenAI-compatible server the gateway may forward to, by URL (llama-server, Ollama's ``/v1``, vLLM, a
    hosted API): agents ask for it by its name in ``[gateway.upstreams]``."""

    url: HttpBase = Field(description="the OpenAI-compatible base URL, ending in /v1")
    model: str | None = Field(default=None, description="the model name the upstream knows; none = the upstream's name")
    api_key: SecretStr | None = Field(default=None, description="sent as Authorization: Bearer to the upstream")
    role: str | None = Field(default=None, description="the role recorded for calls to it; none = gateway.default_role")


class GatewayRole(Section):
    """How the gateway serves a role's name when the deployments do not say (before a first deployment)."""

    base: str | None = Field(
        default=None, description="the upstream (a name in [gateway.upstreams]) serving the role's base model"
    )
    route: Literal["service", "bandit"] = Field(
        default="service",
        description="service: the version in service (canary split by session); bandit: the Selector chooses among"
        " bandit.models (each an upstream or a version name) and records arm.selected",
    )


class GatewayKey(Section):
    """One API key: its name, its SHA-256 (never the key itself), what it may do."""

    name: str = Field(min_length=1, max_length=200, description="recorded with each call the key makes")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="hex SHA-256 of the key (`flywheel gateway hash-key`)")
    roles: list[str] = Field(default_factory=lambda: ["*"], description="roles (and their versions) it may call")
    sessions: list[str] = Field(
        default_factory=lambda: ["*"],
        description="session patterns (fnmatch) whose interactions it may post feedback and outcomes for; only ever"
        " its own interactions",
    )


SessionSource = Literal["header", "openai_user", "anthropic_metadata"]
SESSION_SOURCES: tuple[SessionSource, ...] = ("header", "openai_user", "anthropic_metadata")


class GatewayConfig(PluginSection):
    """The OpenAI- and Anthropic-compatible gateway agents call (``plugins/serving/gateway``): routes a role's name
    to the version in service, splits canary traffic by session, records every call."""

    section_name: ClassVar[str] = "gateway"

    enabled: bool = Field(default=True, description="serve the gateway from flywheel up")
    host: str = Field(default="127.0.0.1", min_length=1, description="interface; forced to 127.0.0.1 without keys")
    port: int = Field(default=8787, ge=0, le=65535, description="0 = any free port (the URL is printed)")
    session_sources: list[SessionSource] = Field(
        default_factory=lambda: list(SESSION_SOURCES),
        description="where the session id comes from, first found wins: the session header, OpenAI's `user`,"
        " Anthropic's `metadata.user_id`; none found = a session of its own",
    )
    session_header: str = Field(default="x-flywheel-session", min_length=1)
    default_role: str = Field(default="coder", pattern=r"^[a-z][a-z0-9_-]{0,31}$",
                              description="the role recorded for calls to an upstream that names none")
    capture_rate: float = Field(
        default=1.0, ge=0, le=1, description="share of sessions recorded (by a hash of the session: all or none)"
    )
    exclude_patterns: list[str] = Field(
        default_factory=list, description="regular expressions; a call whose prompt matches one is not recorded"
    )
    upstreams: dict[str, GatewayUpstream] = Field(default_factory=dict, description="name -> upstream by URL")
    roles: dict[str, GatewayRole] = Field(default_factory=dict, description="role -> its base upstream, its routing")
    prompt_texts: dict[str, str] = Field(
        default_factory=dict, description="prompt variant id (bandit.prompt_variants) -> the system prompt it adds"
    )
    keys: list[GatewayKey] = Field(default_factory=list, description="API keys; none = loopback only")
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, description="larger request bodies get 413")
    connect_timeout_s: float = Field(default=2.0, gt=0, description="connecting to an upstream")
    request_timeout_s: float = Field(default=600.0, gt=0, description="longest wait for an upstream's answer")
    max_connections: int = Field(default=256, ge=1, description="kept-alive connections to upstreams, in all")
    record_capacity: int = Field(
        default=50_000, ge=100, description="records held in memory while the bus is slow or down; more spill to disk"
    )
    spill_after_s: float = Field(
        default=2.0, gt=0, description="records unsent this long (bus down) are written to the spill folder"
    )
    feedback_lookback_h: float = Field(
        default=24.0, ge=0, description="on start, the gateway learns whose interactions the last hours hold"
        " (so feedback is accepted across restarts and other gateways)",
    )

    @field_validator("exclude_patterns")
    @classmethod
    def _regexes(cls, value: list[str]) -> list[str]:
        import re

        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a regular expression: {exc}") from None
        return value

    @field_validator("keys")
    @classmethod
    def _distinct_keys(cls, value: list[GatewayKey]) -> list[GatewayKey]:
        names = [k.name for k in value]
        if len(set(names)) != len(names) or len({k.sha256 for k in value}) != len(value):
            raise ValueError("key names and hashes must be distinct")
        return value
