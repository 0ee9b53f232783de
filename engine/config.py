"""The one configuration model: defaults < TOML file < environment variables.

The file is ``flywheel.toml`` in the working directory, or the path in ``FLYWHEEL_CONFIG``.
Environment variables use the prefix ``FLYWHEEL_`` and ``__`` between levels, e.g.
``FLYWHEEL_NATS__URL=nats://127.0.0.1:4222``. A bad value raises ``ConfigError`` naming the
key, the value and what is allowed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)


class ConfigError(ValueError):
    """A configuration value that is not allowed."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NatsConfig(Section):
    """Where the bus is. No URL: the engine starts its own embedded nats-server."""

    url: str | None = Field(default=None, description="nats://host:port[,nats://...]; none = embedded")
    user: str | None = None
    password: str | None = None
    token: str | None = None
    creds_file: Path | None = Field(default=None, description="a NATS .creds file (NKey + JWT)")
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    connect_timeout_s: float = Field(default=5.0, gt=0)
    publish_timeout_s: float = Field(default=5.0, gt=0)
    publish_retry_s: float = Field(
        default=60.0, ge=0, description="how long a publish keeps retrying through a reconnect"
    )

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        for part in value.split(","):
            if not part.strip().startswith(("nats://", "tls://", "ws://", "wss://")):
                raise ValueError("each URL must start with nats://, tls://, ws:// or wss://")
        return value


class StreamsConfig(Section):
    """The two streams: the raw intake (short retention) and the immutable log."""

    raw_max_age_days: float = Field(default=30.0, gt=0)
    log_max_age_days: float = Field(default=0.0, ge=0, description="0 keeps the log forever")
    duplicate_window_s: float = Field(default=120.0, gt=0)
    replicas: int = Field(default=1, ge=1, le=5)
    prefix: str = Field(default="FLYWHEEL", pattern=r"^[A-Z][A-Z0-9_]{0,30}$")


class WorkerConfig(Section):
    """How processors consume: batch size, retries with back-off, ack wait."""

    batch: int = Field(default=256, ge=1, le=10_000)
    fetch_timeout_s: float = Field(default=1.0, gt=0)
    ack_wait_s: float = Field(default=30.0, gt=0)
    max_attempts: int = Field(default=5, ge=1, le=100)
    backoff_s: float = Field(default=0.5, ge=0, description="first retry delay; doubles each try")
    max_backoff_s: float = Field(default=30.0, ge=0)


class PluginsConfig(Section):
    """Which plugins run. Names are entry-point names in the ``flywheel`` group."""

    enabled: list[str] | None = Field(default=None, description="None = every installed plugin")
    disabled: list[str] = Field(default_factory=list)


class TelemetryConfig(Section):
    exporter: Literal["none", "console", "otlp"] = "none"
    service_name: str = "flywheel"
    otlp_endpoint: str | None = None


class Settings(BaseSettings):
    """Everything Flywheel can be told."""

    model_config = SettingsConfigDict(
        env_prefix="FLYWHEEL_",
        env_nested_delimiter="__",
        extra="forbid",
        toml_file="flywheel.toml",
    )

    state_dir: Path = Field(default=Path(".flywheel"), description="local state: projections, embedded NATS data")
    nats: NatsConfig = Field(default_factory=NatsConfig)
    streams: StreamsConfig = Field(default_factory=StreamsConfig)
    worker: WorkerConfig = Field(default_factory=WorkerConfig)
    plugins: PluginsConfig = Field(default_factory=PluginsConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_path = os.environ.get("FLYWHEEL_CONFIG", "flywheel.toml")
        return (
            init_settings,
            env_settings,
            TomlConfigSettingsSource(settings_cls, toml_file=toml_path),
        )


def _describe(err: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in err["loc"])
    value = err.get("input")
    shown = repr(value) if not isinstance(value, dict) else "{...}"
    allowed = err["msg"]
    ctx = err.get("ctx") or {}
    if "expected" in ctx:
        allowed = f"expected {ctx['expected']}"
    if err["type"] == "extra_forbidden":
        allowed = "no such setting"
    return f"{key} = {shown}: {allowed}"


def load_settings(**overrides: Any) -> Settings:
    """Read the settings; raise ``ConfigError`` with one line per bad key."""
    path = os.environ.get("FLYWHEEL_CONFIG")
    if path and not Path(path).is_file():
        raise ConfigError(f"FLYWHEEL_CONFIG = {path!r}: no such file")
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = [_describe(e) for e in exc.errors(include_url=False)]
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None
    except (OSError, ValueError) as exc:  # a TOML file that does not parse
        raise ConfigError(f"cannot read configuration: {exc}") from None
