"""Built-in projection ``bandit_state``: per (role, decision, arm) pulls and reward sums.

Folds ``quality.assessed`` with ``engine.bandit.credit_changes`` (an interaction that is
re-assessed replaces its previous reward) and counts ``arm.selected`` choices, so
``flywheel stats`` can show how often each arm was chosen next to how it did. The
``Selector`` folds the same events in memory with the same function; both can be rebuilt
from the log at any time.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from flywheel_loop.engine.projection import Projection
from flywheel_loop.schemas import Event
from flywheel_loop.sdk.bandit import Credit, credit_changes


class BanditStateProjection(Projection):
    """Arm statistics learned from rewards, and the choices the selectors made."""

    name = "bandit_state"
    consumes = ("quality.assessed", "arm.selected", "data.forgotten")
    version = 2  # forgets the per-interaction credits of data.forgotten
    tables = """
    CREATE TABLE IF NOT EXISTS arms (
        role TEXT NOT NULL, decision TEXT NOT NULL, arm TEXT NOT NULL,
        pulls INTEGER NOT NULL, reward_sum REAL NOT NULL, selected INTEGER NOT NULL,
        PRIMARY KEY (role, decision, arm));
    CREATE TABLE IF NOT EXISTS credits (
        interaction_id TEXT PRIMARY KEY, role TEXT NOT NULL, prompt_variant TEXT, model_id TEXT,
        reward REAL NOT NULL);
    """

    def apply(self, db: sqlite3.Connection, event: Event[Any], seq: int) -> None:
        d = event.data
        if event.type == "data.forgotten":
            # the arms' sums stay (they name no one); the per-interaction credit rows go
            db.executemany("DELETE FROM credits WHERE interaction_id = ?", [(i,) for i in d.interaction_ids])
            return
        if event.type == "arm.selected":
            db.execute(
                "INSERT INTO arms VALUES (?, ?, ?, 0, 0.0, 1) ON CONFLICT (role, decision, arm)"
                " DO UPDATE SET selected = selected + 1",
                (d.role, d.decision, d.arm),
            )
            return
        row = db.execute(
            "SELECT role, prompt_variant, model_id, reward FROM credits WHERE interaction_id = ?",
            (d.interaction_id,),
        ).fetchone()
        current = Credit(d.role, d.prompt_variant, d.model_id, d.reward)
        for (role, decision, arm), pulls, reward in credit_changes(Credit(*row) if row else None, current):
            db.execute(
                "INSERT INTO arms VALUES (?, ?, ?, ?, ?, 0) ON CONFLICT (role, decision, arm) DO UPDATE"
                " SET pulls = pulls + excluded.pulls, reward_sum = reward_sum + excluded.reward_sum",
                (role, decision, arm, pulls, reward),
            )
        db.execute(
            "INSERT OR REPLACE INTO credits VALUES (?, ?, ?, ?, ?)",
            (d.interaction_id, d.role, d.prompt_variant, d.model_id, d.reward),
        )


