"""Projection ``rounds`` and the dashboard page ``/pages/rounds``: each round's figures, from the log.

The projection keeps the events a round is made of (``plugins/shared/rounds.py``: ``ROUND_EVENTS``;
none carries personal text) in log order; the page folds them into rounds when it is read."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from flywheel_loop.engine.config import Settings
from flywheel_loop.engine.projection import Projection
from flywheel_loop.plugins.shared.rounds import ROUND_EVENTS, fold_rounds
from flywheel_loop.schemas import Event, InvalidEvent, parse_event

__all__ = ["NAME", "RoundEvents", "round_rows"]

NAME = "rounds"
COLUMNS = ("round", "role", "model sampled", "tasks", "samples", "pass@1", "pass@k", "k", "rows added",
           "pairs added", "dataset", "run", "stage")


class RoundEvents(Projection):
    name = NAME
    consumes = ROUND_EVENTS
    tables = "CREATE TABLE IF NOT EXISTS round_events (seq INTEGER PRIMARY KEY, body TEXT NOT NULL);"

    def apply(self, db: sqlite3.Connection, event: Event[Any], seq: int) -> None:
        db.execute("INSERT OR REPLACE INTO round_events VALUES (?, ?)", (seq, event.model_dump_json()))


def round_rows(settings: Settings) -> tuple[Sequence[str], Sequence[Sequence[Any]]]:
    """The dashboard page's table: one row per round."""
    path = settings.layout.projection(NAME)
    if not path.is_file():
        return COLUMNS, []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        raw = db.execute("SELECT seq, body FROM round_events ORDER BY seq").fetchall()
    except sqlite3.OperationalError:
        return COLUMNS, []
    finally:
        db.close()
    events: list[tuple[int, Event[Any]]] = []
    for seq, body in raw:
        try:
            events.append((seq, parse_event(body)))
        except InvalidEvent:
            continue
    rows = [
        [n, r.role, r.model_version, r.tasks, r.samples, round(r.pass_at_1, 3), round(r.pass_at_k, 3), r.k,
         r.rows_added, r.pairs_added, (r.dataset or "")[:12], r.run_id or "", r.stage]
        for n, r in enumerate(fold_rounds(events), 1)
    ]
    return COLUMNS, rows
