"""The one event envelope, the catalogue of payloads, parsing and serialisation.

Every event on the log is ``Event[Payload]``: an envelope (id, type, schema version, time,
source, causation and correlation ids) around one typed payload. A payload class declares
its event type, the schema version and the stream it lives on; subclassing ``Payload``
registers it in the catalogue, so parsing, JSON Schema export and subject routing all read
one table.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Generic, Literal, TypeVar

import orjson
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from flywheel_loop.schemas.ids import ID_PATTERN, derive_id, new_id
from flywheel_loop.schemas.personal import Sealed

EventId = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
Stream = Literal["raw", "log"]

#: Envelope fields a message must carry (the models would otherwise fill them in, and a
#: replay would then see a different id or time than the live run did).
WIRE_REQUIRED = ("id", "type", "schema_version", "time", "source", "data")

#: Largest encoded event the engine accepts (NATS' default max payload is 1 MiB).
MAX_EVENT_BYTES = 1024 * 1024


class InvalidEvent(ValueError):
    """A message that is not a valid event. ``reason`` names the field and the rule."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Payload(BaseModel):
    """Base of every event payload: strict (unknown fields rejected) and immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=False)

    event_type: ClassVar[str]
    schema_version: ClassVar[int] = 1
    stream: ClassVar[Stream] = "log"
    #: dotted path to the id whose key seals this payload's personal fields on the log (the interaction
    #: the text belongs to); a log payload with personal fields must name one (``schemas/personal.py``)
    data_subject: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        event_type = cls.__dict__.get("event_type")
        if event_type:
            if event_type in CATALOGUE:
                raise TypeError(f"event type {event_type!r} is declared twice")
            CATALOGUE[event_type] = cls


#: event type -> payload class; filled by ``Payload.__init_subclass__``.
CATALOGUE: dict[str, type[Payload]] = {}

P = TypeVar("P", bound=Payload)


class Event(BaseModel, Generic[P]):
    """The envelope. ``id`` is also the JetStream ``Nats-Msg-Id``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: EventId = Field(description="time-ordered unique id (ULID)")
    type: str = Field(description="the event type, e.g. interaction.recorded")
    schema_version: int = Field(ge=1, description="version of the payload schema")
    time: AwareDatetime = Field(description="when it happened (UTC, ISO 8601)")
    source: Annotated[str, StringConstraints(min_length=1, max_length=200)] = Field(
        description="who emitted it: an agent, 'sdk', or a plugin's processor name"
    )
    causation_id: EventId | None = Field(default=None, description="the event that caused this one")
    correlation_id: EventId | None = Field(
        default=None, description="the interaction or run this event belongs to"
    )
    data: P
    sealed: Sealed | None = Field(
        default=None,
        description="the payload's personal fields, encrypted under its data subject's key; while it is"
        " present those fields hold blanks (absent: the payload is whole)",
    )

    @property
    def subject(self) -> str:
        return subject_for(self.type)

    @property
    def forgotten(self) -> bool:
        """Whether the payload's personal fields are withheld: ``sealed`` is still there, so they hold
        blanks and only the rest of the payload is readable. The engine opens every sealed event whose
        key exists, so a plugin sees this only for a data subject that was forgotten (its key
        destroyed); a reader without the key store (the agent SDK) sees every sealed event so."""
        return self.sealed is not None

    def to_bytes(self) -> bytes:
        """The wire form: compact JSON through orjson (``sealed`` only when there is one)."""
        return orjson.dumps(self.model_dump(mode="python", exclude=None if self.sealed else {"sealed"}))


_ENVELOPES: dict[type[Payload], Any] = {}


def envelope_of(payload_cls: type[Payload]) -> Any:
    """``Event[payload_cls]``, made once (pydantic's own lookup of a generic costs more than a parse)."""
    cls = _ENVELOPES.get(payload_cls)
    if cls is None:
        cls = _ENVELOPES[payload_cls] = Event[payload_cls]  # type: ignore[valid-type]
    return cls


def subject_for(event_type: str) -> str:
    """The NATS subject an event type is published on (``fw.<stream>.<type>``)."""
    return f"fw.{CATALOGUE[event_type].stream}.{event_type}"


def filter_subjects(event_types: tuple[str, ...] | list[str]) -> list[str]:
    """The subjects a consumer of these types filters on (one wildcard for a whole stream)."""
    streams = {CATALOGUE[t].stream for t in event_types}
    if len(streams) != 1:
        raise ValueError(f"event types {list(event_types)} span streams {sorted(streams)}")
    stream = streams.pop()
    if set(event_types) >= {t for t, c in CATALOGUE.items() if c.stream == stream}:
        return [f"fw.{stream}.>"]
    return [subject_for(t) for t in event_types]


def new_event(
    data: Payload,
    *,
    source: str,
    cause: Event[Any] | None = None,
    correlation_id: str | None = None,
    event_id: str | None = None,
) -> Event[Any]:
    """Wrap a payload in an envelope. A caused event inherits its cause's correlation id."""
    eid = event_id or new_id()
    if correlation_id is None:
        correlation_id = (cause.correlation_id or cause.id) if cause is not None else eid
    cls: Any = envelope_of(type(data))
    event: Event[Any] = cls(
        id=eid,
        time=datetime.now(UTC),
        type=data.event_type,
        schema_version=data.schema_version,
        source=source,
        causation_id=cause.id if cause is not None else None,
        correlation_id=correlation_id,
        data=data,
    )
    return event


def derived_event(data: Payload, *, cause: Event[Any], source: str, index: int = 0) -> Event[Any]:
    """An event produced by ``source`` from ``cause``: its id is derived from both, so a
    redelivered cause produces the same id and the log stores it once."""
    if not isinstance(data, Payload):
        raise TypeError(f"{source} produced {type(data).__name__}, not an event payload")
    # Every field is already validated (the payload by its model, the rest by construction),
    # so skip a second validation on the hot path.
    cls: Any = envelope_of(type(data))
    event: Event[Any] = cls.model_construct(
        id=derive_id(cause.id, source, index),
        type=data.event_type,
        schema_version=data.schema_version,
        time=datetime.now(UTC),
        source=source,
        causation_id=cause.id,
        correlation_id=cause.correlation_id or cause.id,
        data=data,
    )
    return event


def describe_validation_error(err: ValidationError) -> str:
    """One line per failing field: ``data.rating: Input should be less than or equal to 5``."""
    parts = []
    for e in err.errors(include_url=False):
        loc = ".".join(str(x) for x in e["loc"]) or "(event)"
        parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)


_TYPE_PEEK = re.compile(rb'^\{"id":"[0-9A-Z]{26}","type":"([a-z_.]+)"')


def parse_event(raw: bytes | str | dict[str, Any]) -> Event[Any]:
    """Validate a message into a typed event, or raise ``InvalidEvent`` naming the field."""
    if isinstance(raw, bytes) and len(raw) <= MAX_EVENT_BYTES:
        # Fast path for what this engine writes (orjson, envelope fields in order): one pass
        # of pydantic's JSON validator. Anything else, or any error, takes the full path below,
        # which gives the precise message.
        peek = _TYPE_PEEK.match(raw)
        payload_cls = CATALOGUE.get(peek.group(1).decode()) if peek else None
        if payload_cls is not None:
            try:
                event: Event[Any] = envelope_of(payload_cls).model_validate_json(raw)
            except ValidationError:
                pass
            else:
                if event.type == payload_cls.event_type and event.schema_version <= payload_cls.schema_version:
                    return event
    if isinstance(raw, (bytes, str)):
        size = len(raw.encode("utf-8", "surrogatepass")) if isinstance(raw, str) else len(raw)
        if size > MAX_EVENT_BYTES:
            raise InvalidEvent(f"event is {size} bytes; the limit is {MAX_EVENT_BYTES}")
        try:
            raw = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise InvalidEvent(f"not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise InvalidEvent(f"an event is a JSON object, got {type(raw).__name__}")
    event_type = raw.get("type")
    payload_cls = CATALOGUE.get(event_type) if isinstance(event_type, str) else None
    if payload_cls is None:
        known = ", ".join(sorted(CATALOGUE))
        raise InvalidEvent(f"type: unknown event type {event_type!r}; known types: {known}")
    missing = [f for f in WIRE_REQUIRED if f not in raw]
    if missing:
        raise InvalidEvent(f"{missing[0]}: field required on the wire")
    version = raw.get("schema_version")
    if isinstance(version, int) and version > payload_cls.schema_version:
        raise InvalidEvent(
            f"schema_version: {event_type} version {version} is newer than this engine "
            f"understands ({payload_cls.schema_version})"
        )
    try:
        validated: Event[Any] = envelope_of(payload_cls).model_validate(raw)
        return validated
    except ValidationError as exc:
        raise InvalidEvent(describe_validation_error(exc)) from None


def json_schema(event_type: str) -> dict[str, Any]:
    """The JSON Schema of one event type, envelope included, for publishers in any language."""
    payload_cls = CATALOGUE[event_type]
    schema = Event[payload_cls].model_json_schema()  # type: ignore[valid-type]
    schema["title"] = event_type
    schema["$id"] = f"https://flywheel.dev/schemas/{event_type}.v{payload_cls.schema_version}.json"
    props = schema["properties"]
    props["type"] = {"const": event_type, "description": "the event type"}
    props["schema_version"] = {"const": payload_cls.schema_version, "description": "payload version"}
    schema["required"] = sorted(set(schema.get("required", [])) | set(WIRE_REQUIRED))
    return schema
