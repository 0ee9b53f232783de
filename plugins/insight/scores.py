"""Built-in projection ``scores``: the current score of every interaction.

Each ``quality.assessed`` replaces the interaction's row (the latest assessment on the log
wins: the scorer emits a new one whenever evidence changes it). The aggregates for
``flywheel stats`` (per model, prompt variant and role, over a window or all time) are
queries over these rows, so a re-assessed interaction counts once, with its latest score.

A ``data.forgotten`` deletes the rows of the interactions it lists and records their ids
(event ids, nothing about the subject) so that a score arriving later for one of them is
ignored; a replay of the log ends in the same rows.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any

import orjson

from flywheel_loop.engine.projection import Projection
from flywheel_loop.schemas import DataForgotten, Event
from flywheel_loop.schemas.ids import id_time_ms

#: The columns ``aggregates`` may group by.
GROUPS = ("role", "model_id", "prompt_variant")


class Scores(Projection):
    """Current score per interaction, with what it is grouped and averaged by."""

    name = "scores"
    consumes = ("quality.assessed", "data.forgotten")
    version = 2
    tables = """
    CREATE TABLE IF NOT EXISTS scores (
        interaction_id TEXT PRIMARY KEY,
        interaction_ms INTEGER NOT NULL,  -- when the interaction happened (from its id)
        role TEXT NOT NULL, model_id TEXT, prompt_variant TEXT, complexity TEXT, domain TEXT,
        cost_usd REAL, duration_ms REAL,
        reward REAL NOT NULL, confidence REAL NOT NULL,
        scores TEXT NOT NULL, assessors TEXT NOT NULL, fallbacks TEXT NOT NULL,
        event_id TEXT NOT NULL, seq INTEGER NOT NULL,
        assessments INTEGER NOT NULL  -- how many quality.assessed this interaction had
    );
    CREATE INDEX IF NOT EXISTS scores_by_time ON scores (interaction_ms);
    CREATE TABLE IF NOT EXISTS forgotten (interaction_id TEXT PRIMARY KEY, seq INTEGER NOT NULL);
    """

    def apply(self, db: sqlite3.Connection, event: Event[Any], seq: int) -> None:
        d = event.data
        if isinstance(d, DataForgotten):
            rows = [(i,) for i in d.interaction_ids]
            db.executemany("DELETE FROM scores WHERE interaction_id = ?", rows)
            db.executemany("INSERT OR IGNORE INTO forgotten VALUES (?, ?)", [(i, seq) for i in d.interaction_ids])
            return
        if db.execute("SELECT 1 FROM forgotten WHERE interaction_id = ?", (d.interaction_id,)).fetchone():
            return  # scored after it was forgotten: not kept
        db.execute(
            "INSERT INTO scores VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1)"
            " ON CONFLICT (interaction_id) DO UPDATE SET"
            " role = excluded.role, model_id = excluded.model_id,"
            " prompt_variant = excluded.prompt_variant, complexity = excluded.complexity,"
            " domain = excluded.domain, cost_usd = excluded.cost_usd, duration_ms = excluded.duration_ms,"
            " reward = excluded.reward, confidence = excluded.confidence, scores = excluded.scores,"
            " assessors = excluded.assessors, fallbacks = excluded.fallbacks,"
            " event_id = excluded.event_id, seq = excluded.seq, assessments = assessments + 1",
            (
                d.interaction_id,
                id_time_ms(d.interaction_id),
                d.role,
                d.model_id,
                d.prompt_variant,
                d.complexity,
                d.domain,
                d.cost_usd,
                d.duration_ms,
                d.reward,
                d.confidence,
                orjson.dumps(d.scores, option=orjson.OPT_SORT_KEYS).decode(),
                orjson.dumps(d.assessors, option=orjson.OPT_SORT_KEYS).decode(),
                orjson.dumps(d.fallbacks).decode(),
                event.id,
                seq,
            ),
        )


@dataclass(frozen=True)
class Aggregate:
    """Averages over the current scores of a group of interactions."""

    key: str | None
    interactions: int
    reward: float | None
    confidence: float | None
    cost_usd: float | None
    duration_ms: float | None


def aggregates(db: sqlite3.Connection, by: str | None = None, since_ms: int | None = None) -> list[Aggregate]:
    """Averages per ``by`` (one of ``GROUPS``; None: everything as one row), over the
    interactions since ``since_ms`` (None: all time), largest groups first."""
    if by is not None and by not in GROUPS:
        raise ValueError(f"cannot group by {by!r}; choose one of {GROUPS}")
    key = by or "NULL"
    where = "WHERE interaction_ms >= ?" if since_ms is not None else ""
    rows = db.execute(
        f"SELECT {key}, COUNT(*), AVG(reward), AVG(confidence), AVG(cost_usd), AVG(duration_ms)"
        f" FROM scores {where} GROUP BY {key} ORDER BY COUNT(*) DESC, {key}",
        () if since_ms is None else (since_ms,),
    ).fetchall()
    return [Aggregate(*row) for row in rows if row[1]]


