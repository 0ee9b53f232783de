"""Built-in processor ``training_trigger``: decides when a role is trained, as events.

It consumes ``quality.assessed``, ``drift.detected``, ``training.requested`` (its own and
manual ones), ``training.completed``, ``training.failed`` and ``dataset.skipped``, and emits
``training.requested`` with the reason and the log position it covers (the sequence of the
event that tipped it):

- **volume**: the role has ``curation.trigger.export_min`` (100) new high-quality examples
  since its last request and ``train_min`` (500) in all, no run in flight, and
  ``min_interval_s`` has passed since its last request. High quality means a reward of at
  least ``curation.min_reward`` (0.7) moved by complexity (simple -0.05, complex +0.05,
  expert +0.10); an interaction counts once, from the first score that clears the bar.
- **drift**: ``drift.detected`` for the role (if ``on_drift``), the interval aside; one that
  arrives while a run is in flight is remembered and fires when the run ends.
- **manual**: ``flywheel train --role ROLE`` publishes a request itself (``request_training``).

A run is in flight from a request until ``training.completed`` / ``training.failed`` for the
role, or a ``dataset.skipped`` for that request (or ``stale_after_s`` without either). When it
ends, a threshold crossed meanwhile fires once.

**Once per crossing, across processes and restarts.** The counters are a fold of the log that every
trigger process keeps (``flywheel_loop.engine.state``), and the decision is part of the fold: all
processes decide the same at the same position, the one the input was delivered to publishes it
(the same derived id, so the log keeps one copy), and a redelivered input whose request is on the
log changes nothing. Decisions use event times, not the clock, so the same events give
the same decisions.
"""

from __future__ import annotations

import logging
import sqlite3
from typing import Any

from flywheel_loop.engine.config import Settings
from flywheel_loop.engine.processor import Processor, decided
from flywheel_loop.plugins.curation.settings import CurationConfig
from flywheel_loop.schemas import (
    DatasetSkipped,
    DriftDetected,
    Event,
    QualityAssessed,
    TrainingCompleted,
    TrainingFailed,
    TrainingRequested,
    derived_event,
)

log = logging.getLogger(__name__)

__all__ = ["NAME", "TriggerState", "processor"]

NAME = "training_trigger"
CONSUMES = (
    "quality.assessed",
    "drift.detected",
    "training.requested",
    "training.completed",
    "training.failed",
    "dataset.skipped",
)

TABLES = """
CREATE TABLE IF NOT EXISTS examples (
    interaction_id TEXT PRIMARY KEY, role TEXT NOT NULL, high INTEGER NOT NULL,
    first_high_seq INTEGER);
CREATE INDEX IF NOT EXISTS examples_by_role ON examples (role, high, first_high_seq);
CREATE TABLE IF NOT EXISTS roles (
    role TEXT PRIMARY KEY,
    covered INTEGER NOT NULL DEFAULT 0,      -- log position the last request covered
    in_flight TEXT,                          -- id of the request whose run is in flight
    in_flight_ms INTEGER,
    last_request_ms INTEGER,
    drift_pending INTEGER NOT NULL DEFAULT 0);
"""


def _ms(event: Event[Any]) -> int:
    return int(event.time.timestamp() * 1000)


class TriggerState:
    """The trigger's counters (tables the processor's fold keeps), and the decision step over them."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    # ------------------------------------------------------------------ reads

    def role(self, role: str) -> dict[str, Any]:
        self.db.execute("INSERT OR IGNORE INTO roles (role) VALUES (?)", (role,))
        row = self.db.execute(
            "SELECT covered, in_flight, in_flight_ms, last_request_ms, drift_pending FROM roles WHERE role = ?",
            (role,),
        ).fetchone()
        keys = ("covered", "in_flight", "in_flight_ms", "last_request_ms", "drift_pending")
        return dict(zip(keys, row, strict=True))

    def counts(self, role: str, covered: int) -> tuple[int, int]:
        """(new high-quality examples after ``covered``, high-quality examples in all)."""
        new, total = self.db.execute(
            "SELECT COALESCE(SUM(first_high_seq > ?), 0), COUNT(*) FROM examples WHERE role = ? AND high = 1",
            (covered, role),
        ).fetchone()
        return int(new), int(total)


    # ------------------------------------------------------------------ the step

    def apply(self, event: Event[Any], seq: int, curation: CurationConfig) -> TrainingRequested | None:
        """Fold one event in; return the request it causes, if any (caller holds the transaction)."""
        data = event.data
        now = _ms(event)
        cfg = curation.trigger
        if isinstance(data, QualityAssessed):
            self._score(data, seq, curation)
            return self._volume(data.role, seq, now, curation)
        if isinstance(data, DriftDetected):
            if not cfg.on_drift:
                return None
            state = self.role(data.role)
            if self._busy(state, now, curation):
                self.db.execute("UPDATE roles SET drift_pending = 1 WHERE role = ?", (data.role,))
                return None
            detail = (
                f"{data.metric} dropped {data.drop:.3g} ({data.baseline_value:.3g} -> {data.current_value:.3g})"
                f" over {data.window} events"
            )
            return self._drift(data.role, seq, detail[:2000])
        if isinstance(data, TrainingRequested):
            self.requested(data.role, event.id, data.log_position, now)
            return None
        if isinstance(data, (TrainingCompleted, TrainingFailed)):
            self.db.execute("UPDATE roles SET in_flight = NULL, in_flight_ms = NULL WHERE role = ?", (data.role,))
            return self._after_run(data.role, seq, now, curation)
        if isinstance(data, DatasetSkipped):
            state = self.role(data.role)
            if data.request_id is None or data.request_id == state["in_flight"]:
                self.db.execute("UPDATE roles SET in_flight = NULL, in_flight_ms = NULL WHERE role = ?", (data.role,))
                return self._after_run(data.role, seq, now, curation)
        return None

    def _score(self, data: QualityAssessed, seq: int, curation: CurationConfig) -> None:
        high = curation.is_high_quality(data.reward, data.complexity)
        self.db.execute(
            "INSERT INTO examples VALUES (?, ?, ?, ?) ON CONFLICT (interaction_id) DO UPDATE SET"
            " high = excluded.high, first_high_seq = COALESCE(examples.first_high_seq, excluded.first_high_seq)",
            (data.interaction_id, data.role, int(high), seq if high else None),
        )

    def _busy(self, state: dict[str, Any], now: int, curation: CurationConfig) -> bool:
        if state["in_flight"] is None:
            return False
        return now - int(state["in_flight_ms"] or 0) < curation.trigger.stale_after_s * 1000

    def _volume(self, role: str, seq: int, now: int, curation: CurationConfig) -> TrainingRequested | None:
        cfg = curation.trigger
        state = self.role(role)
        if self._busy(state, now, curation):
            return None
        last = state["last_request_ms"]
        if last is not None and now - int(last) < cfg.min_interval_s * 1000:
            return None
        new, total = self.counts(role, int(state["covered"]))
        if new < cfg.export_min or total < cfg.train_min:
            return None
        detail = (
            f"{new} new high-quality {role} examples since log position {state['covered']}"
            f" (threshold {cfg.export_min}); {total} in all (threshold {cfg.train_min})"
        )
        return TrainingRequested(role=role, reason="volume", log_position=seq, examples=total, detail=detail)

    def _after_run(self, role: str, seq: int, now: int, curation: CurationConfig) -> TrainingRequested | None:
        """A run ended: a drift alarm or a crossing that waited for it fires now."""
        state = self.role(role)
        if state["drift_pending"]:
            self.db.execute("UPDATE roles SET drift_pending = 0 WHERE role = ?", (role,))
            return self._drift(role, seq, "a drift alarm arrived while the last run was in flight")
        return self._volume(role, seq, now, curation)

    def _drift(self, role: str, seq: int, detail: str) -> TrainingRequested:
        _, total = self.counts(role, 0)
        return TrainingRequested(role=role, reason="drift", log_position=seq, examples=total, detail=detail)

    def requested(self, role: str, request_id: str, position: int, now: int) -> None:
        """A request (ours or a manual one) is on its way: the role is in flight, counted up to it."""
        self.role(role)
        self.db.execute(
            "UPDATE roles SET in_flight = ?, in_flight_ms = ?, last_request_ms = ?,"
            " covered = MAX(covered, ?), drift_pending = 0 WHERE role = ?",
            (request_id, now, now, position, role),
        )


class TrainingTrigger:
    """The processor's fold: the counters, and the decision each input causes (a pure policy, so
    every process that folds the log decides the same at the same position)."""

    def __init__(self, settings: Settings) -> None:
        self.curation = CurationConfig.of(settings)

    def fold(self, db: sqlite3.Connection, event: Event[Any], seq: int) -> list[TrainingRequested]:
        state = TriggerState(db)
        if isinstance(event.data, TrainingRequested) and state.role(event.data.role)["in_flight"] == event.id:
            return []  # our own decision coming back: already applied when it was made
        request = state.apply(event, seq, self.curation)
        if request is None:
            return []
        out_id = derived_event(request, cause=event, source=NAME).id
        state.requested(request.role, out_id, request.log_position, _ms(event))
        log.info("training requested for %s (%s): %s", request.role, request.reason, request.detail)
        return [request]


def processor(settings: Settings) -> Processor:
    """The trigger processor, configured by ``settings``."""
    return Processor(
        name=NAME,
        consumes=CONSUMES,
        handle=decided,
        description="requests training per role on volume, drift or by hand; one run per role in flight",
        produces=("training.requested",),
        stateful=True,
        tables=TABLES,
        fold=TrainingTrigger(settings).fold,
        state_version=2,
    )
