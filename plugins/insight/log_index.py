"""Built-in projection: what is on the log, by type and source, and every rejection."""

from __future__ import annotations

import sqlite3
from typing import Any

from flywheel_loop.engine.projection import Projection
from flywheel_loop.schemas import CATALOGUE, Event


class LogIndex(Projection):
    """Counts per event type and source; the rejected events with their reasons."""

    name = "log_index"
    consumes = tuple(t for t, c in CATALOGUE.items() if c.stream == "log")
    personal = False  # types, sources, times and finding counts: never personal
    tables = """
    CREATE TABLE IF NOT EXISTS event_counts (
        type TEXT NOT NULL, source TEXT NOT NULL, count INTEGER NOT NULL,
        first_time TEXT NOT NULL, last_time TEXT NOT NULL, PRIMARY KEY (type, source));
    CREATE TABLE IF NOT EXISTS rejections (
        seq INTEGER PRIMARY KEY, time TEXT NOT NULL, processor TEXT NOT NULL,
        subject TEXT NOT NULL, stream TEXT NOT NULL, sequence INTEGER NOT NULL,
        reason TEXT NOT NULL, attempts INTEGER NOT NULL);
    """

    def apply(self, db: sqlite3.Connection, event: Event[Any], seq: int) -> None:
        when = event.time.isoformat()
        db.execute(
            "INSERT INTO event_counts VALUES (?, ?, 1, ?, ?) ON CONFLICT (type, source) DO UPDATE"
            " SET count = count + 1, last_time = excluded.last_time",
            (event.type, event.source, when, when),
        )
        if event.type == "event.rejected":
            d = event.data
            db.execute(
                "INSERT INTO rejections VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (seq, when, d.processor, d.subject, d.stream_name, d.sequence, d.reason, d.attempts),
            )


