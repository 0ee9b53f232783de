"""Built-in processor ``sampling_trigger``: a ``sampling.requested`` for a role once
``sampling.trigger_new_tasks`` new tasks with tests were recorded for it since its last round
(reason ``volume``), or, with ``sampling.trigger_every_h``, once a new task with tests comes at
least that many hours (by the events' own times) after the role's last round or, before any round,
its first task (reason ``schedule``: at most one round per period, and only when there is something
new to sample). 0 switches each off; with both off, the default, rounds are started by hand
(``flywheel train --method rft``). A pure fold of the log, like the training trigger: every process
decides the same at the same position, a replay decides the same, and a redelivered input changes
nothing."""

from __future__ import annotations

import sqlite3
from typing import Any, Literal

from flywheel_loop.engine.config import Settings
from flywheel_loop.engine.processor import Processor, decided
from flywheel_loop.plugins.sampling.settings import SamplingConfig
from flywheel_loop.schemas import Event, InteractionAnonymized, SamplingRequested

__all__ = ["NAME", "processor"]

NAME = "sampling_trigger"

TABLES = """
CREATE TABLE IF NOT EXISTS sampling_roles (
    role TEXT PRIMARY KEY,
    new_tasks INTEGER NOT NULL DEFAULT 0,
    since_ms INTEGER  -- the time of the role's last round, or of its first task before any round
);
"""


def _ms(event: Event[Any]) -> int:
    return int(event.time.timestamp() * 1000)


class SamplingTrigger:
    def __init__(self, settings: Settings) -> None:
        cfg = SamplingConfig.of(settings)
        self.threshold = cfg.trigger_new_tasks
        self.every_h = cfg.trigger_every_h

    def fold(self, db: sqlite3.Connection, event: Event[Any], seq: int) -> list[SamplingRequested]:
        data = event.data
        if isinstance(data, SamplingRequested):  # ours or a manual one: the count and the period start again
            db.execute("INSERT INTO sampling_roles VALUES (?, 0, ?)"
                       " ON CONFLICT (role) DO UPDATE SET new_tasks = 0, since_ms = excluded.since_ms",
                       (data.role, _ms(event)))
            return []
        if not isinstance(data, InteractionAnonymized) or event.forgotten:
            return []
        tests = data.interaction.context.tests
        if not tests or not tests.strip():
            return []
        role, now = data.interaction.role, _ms(event)
        db.execute("INSERT INTO sampling_roles VALUES (?, 1, ?)"
                   " ON CONFLICT (role) DO UPDATE SET new_tasks = new_tasks + 1", (role, now))
        count, since_ms = db.execute("SELECT new_tasks, since_ms FROM sampling_roles WHERE role = ?",
                                     (role,)).fetchone()
        hours = (now - since_ms) / 3_600_000
        reason: Literal["volume", "schedule"]
        if self.threshold and count >= self.threshold:
            reason, why = "volume", (f"{count} new {role} tasks with tests since the last round"
                                     f" (sampling.trigger_new_tasks = {self.threshold})")
        elif self.every_h and hours >= self.every_h:
            reason, why = "schedule", (f"{count} new {role} tasks with tests in the {hours:.1f} h since the last"
                                       f" round (sampling.trigger_every_h = {self.every_h:g})")
        else:
            return []
        db.execute("UPDATE sampling_roles SET new_tasks = 0, since_ms = ? WHERE role = ?", (now, role))
        return [SamplingRequested(role=role, reason=reason, log_position=seq, detail=why)]


def processor(settings: Settings) -> Processor:
    """The sampling trigger."""
    return Processor(
        name=NAME,
        consumes=("interaction.anonymized", "sampling.requested"),
        handle=decided,
        description="requests a sampling round for a role after sampling.trigger_new_tasks new tasks with tests,"
        " or at most every sampling.trigger_every_h hours when new tasks came",
        produces=("sampling.requested",),
        stateful=True,
        tables=TABLES,
        state_version=2,  # 2: the schedule (since_ms)
        fold=SamplingTrigger(settings).fold,
    )
