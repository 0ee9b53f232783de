"""Assessment: what an assessor receives and returns (the contract of ``register_assessors``).

An assessor is a function a plugin registers as ``Assessor(name, assess, version)``. It
receives the ``Evidence`` known about one anonymized interaction (the interaction, and the
feedback and outcomes that have arrived so far) and returns an ``Assessment``: a score in
[0, 1] for each dimension it had evidence for, or None when the interaction is none of its
business. How assessments combine into one reward is the scoring feature's business.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from flywheel_loop.schemas import FeedbackGiven, InteractionAnonymized, OutcomeObserved

__all__ = ["Assessment", "Assessor", "Evidence"]


def _merged(items: tuple[Any, ...]) -> Any:
    """The latest value of each field across payloads in time order (None/empty = not said)."""
    if not items:
        return None
    update: dict[str, Any] = {}
    for item in items:
        for name in type(item).model_fields:
            value = getattr(item, name)
            if value is not None and value != []:
                update[name] = value
    return items[-1].model_copy(update=update)


@dataclass(frozen=True)
class Evidence:
    """Everything known about one interaction so far.

    ``feedback`` and ``outcomes`` are in event-id order (ids are time-ordered), whatever
    order they arrived in, so the same evidence always gives the same score.
    """

    interaction_id: str
    interaction: InteractionAnonymized
    feedback: tuple[FeedbackGiven, ...] = ()
    outcomes: tuple[OutcomeObserved, ...] = ()
    event_ids: tuple[str, ...] = ()

    def latest_feedback(self) -> FeedbackGiven | None:
        """All feedback folded into one: the latest value of each field that was given."""
        return _merged(self.feedback)  # type: ignore[no-any-return]

    def latest_outcome(self) -> OutcomeObserved | None:
        """All outcomes folded into one: the latest value of each field that was observed."""
        return _merged(self.outcomes)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Assessment:
    """One assessor's verdict.

    ``scores`` holds only the dimensions the assessor had evidence for: leaving one out
    lowers the confidence, guessing would not. ``confidence`` None means "the share of my
    configured dimension weight that had evidence".
    """

    scores: Mapping[str, float]
    version: str
    confidence: float | None = None

    def __post_init__(self) -> None:
        for dim, value in self.scores.items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"score {dim!r} = {value!r}: must be a number in [0, 1]")
        if self.confidence is not None and not 0.0 <= self.confidence <= 1.0:
            raise ValueError(f"confidence {self.confidence!r}: must be in [0, 1]")


@dataclass(frozen=True)
class Assessor:
    """A named scoring function. ``name`` is how ``assessment.assessor_weights``,
    ``dimension_weights``, ``budgets_ms`` and ``disabled`` refer to it, and how it appears in
    ``quality.assessed`` (``<name>.<dimension>``)."""

    name: str
    assess: Callable[[Evidence], Assessment | None]
    version: str = "1"
    description: str = ""

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").isalnum() or not self.name.islower():
            raise ValueError(f"assessor name {self.name!r}: lower-case letters, digits and '_' only")
