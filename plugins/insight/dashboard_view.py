"""Built-in projection ``dashboard``: what the web dashboard shows, folded from the log.

One read model for every page of ``engine/dashboard``: interactions per hour, the latest reward of
each interaction (with its role, model and prompt variant, for the plots and the arms' means), the
bandits' choices, datasets and skipped requests, training runs with their loss points, evaluations
with the gate's verdict, the serving timeline (deployments, failures, rollbacks, drift) and the
rejected events. Times are the events' own times (UTC), so a replay gives the same file.
"""

from __future__ import annotations

import sqlite3
from datetime import UTC
from typing import Any

import orjson

from flywheel_loop.engine.projection import Projection
from flywheel_loop.plugins.insight.dashboard.queries import PROJECTION_NAME, UNKNOWN
from flywheel_loop.schemas import Event

#: the projection's name; the dashboard opens ``<state_dir>/projections/<NAME>.sqlite``
NAME = PROJECTION_NAME

#: the model bucket of assessments that name none
UNKNOWN_MODEL = UNKNOWN
#: the serving timeline's kinds, by event type
TIMELINE_KINDS = {
    "deployment.completed": "deployed",
    "deployment.failed": "deployment failed",
    "deployment.rolled_back": "rolled back",
    "drift.detected": "drift",
}


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


class DashboardView(Projection):
    """Everything the dashboard's pages read, one table per concern."""

    name = NAME
    version = 3  # the gate's three-way verdict and its checks (intervals, item counts)
    consumes = (
        "interaction.anonymized",
        "quality.assessed",
        "arm.selected",
        "dataset.built",
        "dataset.skipped",
        "training.started",
        "training.progressed",
        "training.completed",
        "training.failed",
        "evaluation.completed",
        *TIMELINE_KINDS,
        "event.rejected",
        "data.forgotten",
    )
    tables = """
    CREATE TABLE IF NOT EXISTS interactions_hourly (
        hour TEXT NOT NULL, role TEXT NOT NULL, count INTEGER NOT NULL, PRIMARY KEY (hour, role));
    CREATE TABLE IF NOT EXISTS assessments (
        interaction_id TEXT PRIMARY KEY, seq INTEGER NOT NULL, time TEXT NOT NULL, role TEXT NOT NULL,
        model_id TEXT, prompt_variant TEXT, reward REAL NOT NULL);
    CREATE INDEX IF NOT EXISTS assessments_time ON assessments (time);
    CREATE TABLE IF NOT EXISTS reward_hourly (
        hour TEXT NOT NULL, dimension TEXT NOT NULL, key TEXT NOT NULL, n INTEGER NOT NULL, total REAL NOT NULL,
        PRIMARY KEY (dimension, key, hour));
    CREATE TABLE IF NOT EXISTS arm_rewards (
        role TEXT NOT NULL, decision TEXT NOT NULL, arm TEXT NOT NULL, pulls INTEGER NOT NULL,
        reward_sum REAL NOT NULL, PRIMARY KEY (role, decision, arm));
    CREATE TABLE IF NOT EXISTS arm_choices (
        role TEXT NOT NULL, decision TEXT NOT NULL, arm TEXT NOT NULL, selected INTEGER NOT NULL,
        last_time TEXT NOT NULL, PRIMARY KEY (role, decision, arm));
    CREATE TABLE IF NOT EXISTS datasets (
        seq INTEGER PRIMARY KEY, time TEXT NOT NULL, role TEXT NOT NULL, dataset_hash TEXT NOT NULL,
        request_id TEXT, sizes TEXT NOT NULL, balance TEXT NOT NULL, rehearsal_share REAL NOT NULL,
        lineage_total INTEGER NOT NULL, log_position INTEGER NOT NULL, path TEXT NOT NULL);
    CREATE TABLE IF NOT EXISTS dataset_skips (
        seq INTEGER PRIMARY KEY, time TEXT NOT NULL, role TEXT NOT NULL, reason TEXT NOT NULL,
        detail TEXT NOT NULL, log_position INTEGER NOT NULL);
    CREATE TABLE IF NOT EXISTS runs (
        run_id TEXT PRIMARY KEY, role TEXT, dataset_hash TEXT, base_model TEXT, method TEXT,
        status TEXT NOT NULL, started TEXT, finished TEXT, step INTEGER NOT NULL DEFAULT 0,
        total_steps INTEGER NOT NULL DEFAULT 0, train_loss REAL, val_loss REAL, tokens_per_s REAL,
        duration_s REAL, adapter_hash TEXT, reason TEXT);
    CREATE TABLE IF NOT EXISTS run_points (
        run_id TEXT NOT NULL, step INTEGER NOT NULL, epoch REAL NOT NULL, loss REAL, val_loss REAL,
        time TEXT NOT NULL, PRIMARY KEY (run_id, step));
    CREATE TABLE IF NOT EXISTS evaluations (
        seq INTEGER PRIMARY KEY, time TEXT NOT NULL, run_id TEXT NOT NULL, role TEXT NOT NULL,
        adapter_hash TEXT, candidate TEXT NOT NULL, baseline TEXT NOT NULL, passed INTEGER NOT NULL,
        reasons TEXT NOT NULL, verdict TEXT NOT NULL, checks TEXT NOT NULL);
    CREATE TABLE IF NOT EXISTS timeline (
        seq INTEGER PRIMARY KEY, time TEXT NOT NULL, kind TEXT NOT NULL, role TEXT NOT NULL,
        runtime TEXT, adapter_hash TEXT, summary TEXT NOT NULL);
    CREATE TABLE IF NOT EXISTS rejections (
        seq INTEGER PRIMARY KEY, time TEXT NOT NULL, processor TEXT NOT NULL, subject TEXT NOT NULL,
        stream TEXT NOT NULL, sequence INTEGER NOT NULL, reason TEXT NOT NULL, attempts INTEGER NOT NULL);
    """

    def apply(self, db: sqlite3.Connection, event: Event[Any], seq: int) -> None:
        when = event.time.astimezone(UTC)
        time = when.isoformat()
        d = event.data
        kind = event.type
        if kind == "interaction.anonymized":
            hour = when.replace(minute=0, second=0, microsecond=0).isoformat()
            db.execute(
                "INSERT INTO interactions_hourly VALUES (?, ?, 1) ON CONFLICT (hour, role)"
                " DO UPDATE SET count = count + 1",
                (hour, d.interaction.role),
            )
        elif kind == "quality.assessed":
            self._apply_assessment(db, event, seq, time)
        elif kind == "arm.selected":
            db.execute(
                "INSERT INTO arm_choices VALUES (?, ?, ?, 1, ?) ON CONFLICT (role, decision, arm)"
                " DO UPDATE SET selected = selected + 1, last_time = excluded.last_time",
                (d.role, d.decision, d.arm, time),
            )
        elif kind == "dataset.built":
            db.execute(
                "INSERT OR REPLACE INTO datasets VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (seq, time, d.role, d.dataset_hash, d.request_id, _json(d.sizes),
                 _json([row.model_dump() for row in d.balance]), d.rehearsal_share,
                 d.lineage_total or len(d.lineage), d.log_position, d.path),
            )
        elif kind == "dataset.skipped":
            db.execute(
                "INSERT OR REPLACE INTO dataset_skips VALUES (?, ?, ?, ?, ?, ?)",
                (seq, time, d.role, d.reason, d.detail, d.log_position),
            )
        elif kind.startswith("training."):
            self._apply_training(db, event, time)
        elif kind == "evaluation.completed":
            db.execute(
                "INSERT OR REPLACE INTO evaluations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (seq, time, d.run_id, d.role, d.adapter_hash, _json(d.candidate), _json(d.baseline),
                 int(d.passed), _json(d.reasons), d.outcome, _json([c.model_dump() for c in d.checks])),
            )
        elif kind in TIMELINE_KINDS:
            runtime, adapter, summary = _timeline_entry(event)
            db.execute(
                "INSERT OR REPLACE INTO timeline VALUES (?, ?, ?, ?, ?, ?, ?)",
                (seq, time, TIMELINE_KINDS[kind], d.role, runtime, adapter, summary),
            )
        elif kind == "data.forgotten":
            # hourly and per-arm sums stay (they name no one); the per-interaction rows go
            db.executemany("DELETE FROM assessments WHERE interaction_id = ?", [(i,) for i in d.interaction_ids])
        elif kind == "event.rejected":
            db.execute(
                "INSERT OR REPLACE INTO rejections VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (seq, time, d.processor, d.subject, d.stream_name, d.sequence, d.reason, d.attempts),
            )

    @staticmethod
    def _apply_assessment(db: sqlite3.Connection, event: Event[Any], seq: int, time: str) -> None:
        """Keep each interaction's latest reward, and the hourly and per-arm sums the pages plot,
        so no page has to scan every assessment. A re-assessed interaction replaces its previous
        reward (as the bandits do) and keeps the time it was first scored: the plots put it where
        it happened, not where late evidence arrived."""
        d = event.data
        old = db.execute(
            "SELECT time, role, model_id, prompt_variant, reward FROM assessments WHERE interaction_id = ?",
            (d.interaction_id,),
        ).fetchone()
        if old is not None:
            time = old[0]
            _add_reward(db, old[0], old[1], old[2], old[3], -old[4], -1)
        _add_reward(db, time, d.role, d.model_id, d.prompt_variant, d.reward, 1)
        db.execute(
            "INSERT OR REPLACE INTO assessments VALUES (?, ?, ?, ?, ?, ?, ?)",
            (d.interaction_id, seq, time, d.role, d.model_id, d.prompt_variant, d.reward),
        )

    @staticmethod
    def _apply_training(db: sqlite3.Connection, event: Event[Any], time: str) -> None:
        d = event.data
        # a run's row exists from whichever of its events comes first (progress may precede a
        # started event that a replay bound cut off)
        db.execute("INSERT OR IGNORE INTO runs (run_id, status) VALUES (?, 'running')", (d.run_id,))
        if event.type == "training.started":
            db.execute(
                "UPDATE runs SET role = ?, dataset_hash = ?, base_model = ?, method = ?, started = ?"
                " WHERE run_id = ?",
                (d.role, d.dataset_hash, d.base_model, d.method, time, d.run_id),
            )
        elif event.type == "training.progressed":
            db.execute(
                "INSERT OR REPLACE INTO run_points VALUES (?, ?, ?, ?, ?, ?)",
                (d.run_id, d.step, d.epoch, d.loss, d.val_loss, time),
            )
            db.execute(
                "UPDATE runs SET step = MAX(step, ?), total_steps = ?, tokens_per_s = COALESCE(?, tokens_per_s)"
                " WHERE run_id = ?",
                (d.step, d.total_steps, d.tokens_per_s, d.run_id),
            )
        elif event.type == "training.completed":
            db.execute(
                "UPDATE runs SET status = 'completed', role = ?, base_model = ?, finished = ?, train_loss = ?,"
                " val_loss = ?, tokens_per_s = COALESCE(?, tokens_per_s), duration_s = ?, adapter_hash = ?,"
                " step = MAX(step, ?) WHERE run_id = ?",
                (d.role, d.base_model, time, d.train_loss, d.val_loss, d.tokens_per_s, d.duration_s,
                 d.adapter_hash, d.steps, d.run_id),
            )
        elif event.type == "training.failed":
            db.execute(
                "UPDATE runs SET status = 'failed', role = ?, finished = ?, reason = ? WHERE run_id = ?",
                (d.role, time, d.reason, d.run_id),
            )


def _add_reward(
    db: sqlite3.Connection, time: str, role: str, model_id: str | None, variant: str | None, reward: float, n: int
) -> None:
    """Add (or, with n = -1, take back) one reward in its hour's role and model buckets and its arms."""
    hour = time[:13] + ":00:00+00:00"  # times are stored as UTC ISO 8601
    for dimension, key in (("role", role), ("model", model_id or UNKNOWN_MODEL)):
        db.execute(
            "INSERT INTO reward_hourly VALUES (?, ?, ?, ?, ?) ON CONFLICT (dimension, key, hour)"
            " DO UPDATE SET n = n + excluded.n, total = total + excluded.total",
            (hour, dimension, key, n, reward),
        )
    for decision, arm in (("prompt_variant", variant), ("model", model_id)):
        if arm is not None:
            db.execute(
                "INSERT INTO arm_rewards VALUES (?, ?, ?, ?, ?) ON CONFLICT (role, decision, arm)"
                " DO UPDATE SET pulls = pulls + excluded.pulls, reward_sum = reward_sum + excluded.reward_sum",
                (role, decision, arm, n, reward),
            )


def _timeline_entry(event: Event[Any]) -> tuple[str | None, str | None, str]:
    """(runtime, adapter, one-line summary) of a serving event; the adapter is the one in service
    after it (deployed, rolled back to) or the one it concerns (a failed deployment)."""
    d = event.data
    if event.type == "deployment.completed":
        share = f" at {d.traffic_share:.0%} of traffic" if d.traffic_share < 1 else ""
        return d.runtime, d.adapter_hash, f"{d.model_name} on {d.runtime}{share}"
    if event.type == "deployment.failed":
        return d.runtime, d.adapter_hash, d.reason
    if event.type == "deployment.rolled_back":
        # the adapter in service after the event, as for a deployment; the summary names both
        def name(adapter: str | None) -> str:
            return adapter[:12] if adapter else "the base model"

        return d.runtime, d.to_adapter, f"from {name(d.from_adapter)} to {name(d.to_adapter)}: {d.reason}"
    return None, None, (
        f"{d.metric} {d.baseline_value:.3g} → {d.current_value:.3g} ({d.drop:.0%} lower) over the last {d.window}"
    )


