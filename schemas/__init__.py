"""Flywheel's event vocabulary: the envelope, the payload catalogue, parsing, JSON Schema."""

from flywheel_loop.schemas.envelope import (
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
from flywheel_loop.schemas.events import *  # noqa: F403  (the catalogue is the public surface)
from flywheel_loop.schemas.events import __all__ as _events_all
from flywheel_loop.schemas.ids import derive_id, new_id

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
