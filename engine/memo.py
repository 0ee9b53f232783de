"""What a stateful processor produced for each input, kept beside its own state.

A processor that folds inputs into local state (scoring's evidence, the trigger's counters)
must answer a redelivered input with exactly what it produced the first time, without
applying it again. It writes the memo in the same SQLite transaction as its state change,
then answers redeliveries from it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

import orjson

from schemas import CATALOGUE, Payload

_TABLE = "CREATE TABLE IF NOT EXISTS processed (event_id TEXT PRIMARY KEY, outputs BLOB NOT NULL)"


class OutputMemo:
    """The payloads produced per input event id, in the processor's own database."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        db.execute(_TABLE)

    def recall(self, event_id: str) -> list[Payload] | None:
        """What ``event_id`` produced ([] for nothing), or None when it was never processed."""
        row = self.db.execute("SELECT outputs FROM processed WHERE event_id = ?", (event_id,)).fetchone()
        if row is None:
            return None
        return [CATALOGUE[t].model_validate_json(body) for t, body in orjson.loads(row[0])]

    def remember(self, event_id: str, outputs: Sequence[Payload], replace: bool = False) -> None:
        """Record what ``event_id`` produced (call inside the caller's transaction)."""
        body = orjson.dumps([(p.event_type, p.model_dump_json()) for p in outputs])
        verb = "INSERT OR REPLACE" if replace else "INSERT"
        self.db.execute(f"{verb} INTO processed VALUES (?, ?)", (event_id, body))
