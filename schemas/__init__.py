"""Flywheel's event vocabulary: the envelope, the payload catalogue, parsing, JSON Schema."""

from schemas.envelope import (
    CATALOGUE,
    MAX_EVENT_BYTES,
    Event,
    EventId,
    InvalidEvent,
    Payload,
    derived_event,
    describe_validation_error,
    filter_subjects,
    json_schema,
    new_event,
    parse_event,
    subject_for,
)
from schemas.events import *  # noqa: F403  (the catalogue is the public surface)
from schemas.events import __all__ as _events_all
from schemas.ids import derive_id, new_id

__all__ = [
    "CATALOGUE",
    "MAX_EVENT_BYTES",
    "Event",
    "EventId",
    "InvalidEvent",
    "Payload",
    "derive_id",
    "derived_event",
    "describe_validation_error",
    "filter_subjects",
    "json_schema",
    "new_event",
    "new_id",
    "parse_event",
    "subject_for",
    *_events_all,
]
