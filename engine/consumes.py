"""What processors and projections share: a set of event types to consume."""

from __future__ import annotations

from flywheel_loop.schemas import CATALOGUE, filter_subjects


class ConsumesEvents:
    """Derives the stream and the subject filter from ``consumes`` (the event types)."""

    consumes: tuple[str, ...]

    @property
    def stream(self) -> str:
        return CATALOGUE[self.consumes[0]].stream

    @property
    def subjects(self) -> list[str]:
        return filter_subjects(self.consumes)
