"""Built-in processor ``sampling_trigger``: a ``sampling.requested`` for a role once
``sampling.trigger_new_tasks`` new tasks with tests were recorded for it since its last round
(0, the default, switches it off: rounds are then started by hand with ``flywheel train --method
rft``). A pure fold of the log, like the training trigger: every process decides the same at the
same position, and a redelivered input changes nothing."""

from __future__ import annotations

import sqlite3
from typing import Any

from flywheel_loop.engine.config import Settings
from flywheel_loop.engine.processor import Processor, decided
from flywheel_loop.plugins.sampling.settings import SamplingConfig
from flywheel_loop.schemas import Event, InteractionAnonymized, SamplingRequested

__all__ = ["NAME", "processor"]

NAME = "sampling_trigger"

TABLES = """
CREATE TABLE IF NOT EXISTS sampling_roles (role TEXT PRIMARY KEY, new_tasks INTEGER NOT NULL DEFAULT 0);
"""


class SamplingTrigger:
    def __init__(self, settings: Settings) -> None:
        self.threshold = SamplingConfig.of(settings).trigger_new_tasks

    def fold(self, db: sqlite3.Connection, event: Event[Any], seq: int) -> list[SamplingRequested]:
        data = event.data
        if isinstance(data, SamplingRequested):  # ours or a manual one: the count starts again
            db.execute("INSERT INTO sampling_roles VALUES (?, 0) ON CONFLICT (role) DO UPDATE SET new_tasks = 0",
                       (data.role,))
            return []
        if not isinstance(data, InteractionAnonymized) or event.forgotten:
            return []
        tests = data.interaction.context.tests
        if not tests or not tests.strip():
            return []
        role = data.interaction.role
        db.execute("INSERT INTO sampling_roles VALUES (?, 1)"
                   " ON CONFLICT (role) DO UPDATE SET new_tasks = new_tasks + 1", (role,))
        (count,) = db.execute("SELECT new_tasks FROM sampling_roles WHERE role = ?", (role,)).fetchone()
        if not self.threshold or count < self.threshold:
            return []
        db.execute("UPDATE sampling_roles SET new_tasks = 0 WHERE role = ?", (role,))
        return [SamplingRequested(role=role, reason="volume", log_position=seq,
                                  detail=f"{count} new {role} tasks with tests since the last round"
                                  f" (sampling.trigger_new_tasks = {self.threshold})")]


def processor(settings: Settings) -> Processor:
    """The sampling trigger."""
    return Processor(
        name=NAME,
        consumes=("interaction.anonymized", "sampling.requested"),
        handle=decided,
        description="requests a sampling round for a role after sampling.trigger_new_tasks new tasks with tests",
        produces=("sampling.requested",),
        stateful=True,
        tables=TABLES,
        fold=SamplingTrigger(settings).fold,
    )
