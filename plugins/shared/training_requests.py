"""Asking for a training run by hand: a manual ``training.requested`` covering the log as it is now.

``flywheel train --role R``, the dashboard's request button and the demo publish one; the
curation feature's trigger sees it like its own decisions (the role is in flight until its run
ends) and its dataset builder builds the dataset it asks for.
"""

from __future__ import annotations

from typing import Any

from flywheel_loop.engine.bus import Bus
from flywheel_loop.schemas import Event, TrainingRequested, new_event

__all__ = ["request_training"]


async def request_training(
    bus: Bus, role: str, detail: str = "requested with flywheel train"
) -> Event[Any]:
    """Publish a manual ``training.requested`` for ``role`` covering the log as it is now; return it."""
    position = await bus.last_sequence("log")
    event = new_event(
        TrainingRequested(role=role, reason="manual", log_position=position, detail=detail),
        source="cli",
    )
    await bus.publish(event)
    return event
