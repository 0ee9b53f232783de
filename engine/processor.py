"""A processor: a pure step from one event to the events it causes."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pluggy

from engine.config import Settings
from engine.consumes import ConsumesEvents
from schemas import CATALOGUE, Event, Payload, filter_subjects

Outputs = Iterable[Payload] | None


@dataclass
class ProcessContext:
    """What a handler may use besides its input: settings, a state folder, a logger, and the
    plugin host's hooks (so a processor can call a hook every plugin implements, e.g. ``assess``)."""

    settings: Settings
    state_dir: Path
    log: logging.Logger
    attempt: int = 1
    hooks: pluggy.HookRelay | None = None
    #: the stream sequence of the event being handled (0 outside a worker)
    sequence: int = 0


Handler = Callable[[Event[Any], ProcessContext], Outputs | Awaitable[Outputs]]


@dataclass(frozen=True)
class Processor(ConsumesEvents):
    """One step of the flywheel, consuming ``consumes`` on a durable consumer named ``name``."""

    name: str
    consumes: tuple[str, ...]
    handle: Handler
    description: str = ""
    batch: int | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not self.name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"processor name {self.name!r}: letters, digits, '-' and '_' only")
        unknown = [t for t in self.consumes if t not in CATALOGUE]
        if unknown or not self.consumes:
            raise ValueError(f"processor {self.name!r} consumes unknown event types {unknown}")
        filter_subjects(self.consumes)  # raises when the types span both streams
