"""Asking for a training run by hand: a manual ``training.requested`` (or, for a round of learning from
verified attempts, a ``sampling.requested``) covering the log as it is now.

``flywheel train --role R``, the dashboard's request button and the demo publish one; the
curation feature's trigger sees it like its own decisions (the role is in flight until its run
ends) and its dataset builder builds the dataset it asks for.
"""

from __future__ import annotations

from typing import Any

from flywheel_loop.engine.bus import Bus
from flywheel_loop.schemas import Event, SamplingRequested, TrainingRequested, new_event

__all__ = ["request_sampling", "request_training"]


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


async def request_sampling(
    bus: Bus, role: str, detail: str = "requested with flywheel train --method rft", **options: Any
) -> Event[Any]:
    """Publish a manual ``sampling.requested`` for ``role`` covering the log as it is now (``options``:
    ``k``, ``temperature``, ``max_tasks``, ``seed``; unset ones come from ``[sampling]``); return it. The
    sampler's round ends in ``sampling.completed``, for which the dataset builder builds the dataset."""
    position = await bus.last_sequence("log")
    event = new_event(
        SamplingRequested(role=role, reason="manual", log_position=position, detail=detail, **options),
        source="cli",
    )
    await bus.publish(event)
    return event
