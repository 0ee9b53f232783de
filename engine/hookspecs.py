"""Every hook a Flywheel plugin can implement, in one place.

A plugin is a module or object with functions marked ``@hookimpl`` whose names match the
specifications below. Built-in plugins (``plugins/``) and third-party packages are found the
same way: through the entry-point group ``flywheel``.

The engine owns the I/O (consuming, validating, publishing, acking, storing positions);
plugins hand it pure steps by registering them:

- a **processor** turns one input event into zero or more new events (a policy);
- a **projection** folds events into a local read model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from engine.assessment import Assessment, Evidence
    from engine.config import Settings
    from engine.processor import Processor
    from engine.projection import Projection
    from schemas import InteractionAnonymized

PROJECT = "flywheel"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_processors(register: Callable[[Processor], None], settings: Settings) -> None:
    """Register event processors.

    Called once when the engine starts. Call ``register(Processor(...))`` for each step the
    plugin performs. Each processor gets its own durable JetStream consumer named after it,
    so running more engine processes scales it out. The processor's ``handle`` receives one
    validated event and returns the payloads of the events it produces; the engine derives
    their ids from (input id, processor name, index), publishes them, and acks the input
    only once they are stored.
    """


@hookspec
def register_projections(register: Callable[[Projection], None], settings: Settings) -> None:
    """Register read models folded from the log.

    Called once when the engine starts (and by ``flywheel replay`` and ``status``). Each
    projection is applied in stream order and stores the last sequence it applied in the same
    SQLite transaction as its state, so it resumes exactly after a crash and can be rebuilt
    from the log at any time.
    """


@hookspec
def configure(settings: Settings) -> None:
    """Called once with the loaded settings before anything is registered."""


@hookspec
def assess(interaction: InteractionAnonymized, evidence: Evidence) -> Assessment | None:
    """Score one anonymized interaction on the dimensions this assessor knows.

    Called by the ``scoring`` processor when the interaction arrives, and again each time
    feedback or an outcome for it arrives, late and in any order; ``evidence`` holds all of
    it so far (``evidence.latest_feedback()`` / ``latest_outcome()`` fold it per field).
    Return an ``Assessment`` with a score in [0, 1] for each dimension you had evidence for
    (leave a dimension out rather than guess), or None when the interaction is none of your
    business. Be pure and quick: the same evidence must give the same assessment, and a call
    has a budget (``assessment.budget_ms``, 5 ms); an assessor that raises or overruns is
    recorded as a fallback, and repeated failures open its circuit breaker. The assessor's
    name is its plugin name; ``assessment.assessor_weights`` and ``dimension_weights`` say
    how much it counts.
    """


@hookspec
def synthesize_rehearsal(
    role: str, examples: list[dict[str, Any]], wanted: int, settings: Settings
) -> list[dict[str, Any]] | None:
    """Add synthetic rehearsal rows (e.g. self-synthesized rehearsal with the base model).

    Called by ``dataset_builder`` while it builds a dataset for ``role``, after it picked the
    real rehearsal rows, whenever the past examples could not fill the configured rehearsal
    share (``wanted`` > 0 rows are missing; on a role's first dataset that is all of them).
    ``examples`` are the new training rows (``prompt``, ``completion``, ``messages``, ``domain``,
    ``complexity``). Return rows of the form ``{"prompt": str, "completion": str}`` (optionally
    ``"domain"`` and ``"complexity"``), or None. The builder takes the first ``wanted`` rows of
    all plugins' answers, formats them with the base model's chat template and tags them
    ``rehearsal`` and ``synthetic``. Be deterministic for the same input: a replay must
    rebuild the same dataset byte for byte.
    """
