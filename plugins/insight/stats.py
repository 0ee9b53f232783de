"""``flywheel stats``: what the flywheel has seen, over a recent window and all time.

Everything is read from projection files under ``<state_dir>/projections/`` (read-only,
safe while the engine runs), never from the log, so it is instant:

- ``scores``: average reward, confidence, cost and duration, overall and per model, prompt
  variant and role (the interaction's time, from its id, decides the window);
- ``anonymization`` (this module's projection): interactions, feedback and outcomes
  anonymized, and items scrubbed by kind (counted in hourly buckets, so the window's
  start is rounded down to the hour);
- ``log_index``: rejected events per processor, with the latest reason;
- ``bandit_state``: per arm, rewarded pulls, mean reward and how often it was selected.

``stats_data`` returns plain data (for ``--json``); ``stats_tables`` renders it with rich.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime, timedelta
from typing import Any

from rich.table import Table

from flywheel_loop.engine.config import Settings
from flywheel_loop.engine.projection import Projection
from flywheel_loop.plugins.insight.scores import GROUPS, aggregates
from flywheel_loop.schemas import Event

HOUR_MS = 3_600_000
DEFAULT_WINDOW = timedelta(hours=24)


class Anonymization(Projection):
    """Anonymized events per type and scrubbed items per kind, in hourly buckets."""

    name = "anonymization"
    consumes = ("interaction.anonymized", "feedback.anonymized", "outcome.anonymized")
    personal = False  # types, sources, times and finding counts: never personal
    tables = """
    CREATE TABLE IF NOT EXISTS anonymized (
        hour INTEGER NOT NULL, type TEXT NOT NULL, events INTEGER NOT NULL, PRIMARY KEY (hour, type));
    CREATE TABLE IF NOT EXISTS scrubbed (
        hour INTEGER NOT NULL, kind TEXT NOT NULL, items INTEGER NOT NULL, PRIMARY KEY (hour, kind));
    """

    def apply(self, db: sqlite3.Connection, event: Event[Any], seq: int) -> None:
        hour = int(event.time.timestamp() * 1000) // HOUR_MS
        db.execute(
            "INSERT INTO anonymized VALUES (?, ?, 1) ON CONFLICT (hour, type)"
            " DO UPDATE SET events = events + 1",
            (hour, event.type),
        )
        for kind, count in event.data.findings.counts.items():
            db.execute(
                "INSERT INTO scrubbed VALUES (?, ?, ?) ON CONFLICT (hour, kind)"
                " DO UPDATE SET items = items + excluded.items",
                (hour, kind, count),
            )




# --------------------------------------------------------------------------- reading


def _open(settings: Settings, name: str) -> sqlite3.Connection | None:
    path = settings.layout.projection(name)
    if not path.is_file():
        return None
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def _both(read: Callable[[int | None], dict[str, int]], since_ms: int) -> dict[str, dict[str, int]]:
    """{key: {"window": n, "all": n}} from a reader called with a cut-off and without."""
    window, total = read(since_ms), read(None)
    return {k: {"window": window.get(k, 0), "all": total[k]} for k in sorted(total)}


def stats_data(
    settings: Settings, window: timedelta = DEFAULT_WINDOW, now: datetime | None = None
) -> dict[str, Any]:
    """The numbers behind ``flywheel stats``; projections not built yet are listed in
    ``missing`` (run the engine, or ``flywheel replay``)."""
    now_ms = int((now.timestamp() if now else time.time()) * 1000)
    since_ms = now_ms - int(window.total_seconds() * 1000)
    out: dict[str, Any] = {"window_hours": window.total_seconds() / 3600, "missing": []}

    db = _open(settings, "scores")
    if db is None:
        out["missing"].append("scores")
    else:
        overall = {"window": aggregates(db, None, since_ms), "all": aggregates(db, None, None)}
        out["overall"] = {k: asdict(v[0]) if v else None for k, v in overall.items()}
        out["by"] = {}
        for group in GROUPS:
            recent = {a.key: asdict(a) for a in aggregates(db, group, since_ms)}
            out["by"][group] = [
                {"key": a.key, "window": recent.get(a.key), "all": asdict(a)} for a in aggregates(db, group)
            ]
        db.close()

    db = _open(settings, "anonymization")
    if db is None:
        out["missing"].append("anonymization")
    else:
        since_hour = since_ms // HOUR_MS

        conn = db

        def counts(table: str, key: str, value: str) -> Callable[[int | None], dict[str, int]]:
            def read(since: int | None) -> dict[str, int]:
                where, args = ("WHERE hour >= ?", (since_hour,)) if since is not None else ("", ())
                sql = f"SELECT {key}, SUM({value}) FROM {table} {where} GROUP BY {key}"
                return dict(conn.execute(sql, args).fetchall())

            return read

        out["anonymized"] = _both(counts("anonymized", "type", "events"), since_ms)
        out["scrubbed"] = _both(counts("scrubbed", "kind", "items"), since_ms)
        db.close()

    db = _open(settings, "log_index")
    if db is None:
        out["missing"].append("log_index")
    else:
        rejected: dict[str, dict[str, Any]] = {}
        for when, processor, reason in db.execute(
            "SELECT time, processor, reason FROM rejections ORDER BY seq"
        ).fetchall():
            row = rejected.setdefault(processor, {"processor": processor, "window": 0, "all": 0})
            row["all"] += 1
            row["window"] += datetime.fromisoformat(when).timestamp() * 1000 >= since_ms
            row["last_reason"] = reason
        out["rejected"] = sorted(rejected.values(), key=lambda r: (-r["all"], r["processor"]))
        db.close()

    db = _open(settings, "bandit_state")
    if db is None:
        out["missing"].append("bandit_state")
    else:
        out["arms"] = [
            {
                "role": r,
                "decision": d,
                "arm": a,
                "pulls": n,
                "mean_reward": s / n if n else None,
                "selected": c,
            }
            for r, d, a, n, s, c in db.execute(
                "SELECT role, decision, arm, pulls, reward_sum, selected FROM arms"
                " ORDER BY role, decision, arm"
            ).fetchall()
        ]
        db.close()
    return out


# --------------------------------------------------------------------------- rendering


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _averages_row(agg: dict[str, Any] | None) -> list[str]:
    if not agg:
        return ["0", "-", "-", "-"]
    return [
        str(agg["interactions"]),
        _num(agg["reward"], ".3f"),
        _num(agg["cost_usd"], ".6f"),
        _num(agg["duration_ms"], ".0f"),
    ]


_AVERAGE_COLUMNS = ("interactions", "avg reward", "avg cost $", "avg duration ms")


def stats_tables(settings: Settings, window: timedelta = DEFAULT_WINDOW) -> list[Table]:
    """Rich tables for ``flywheel stats``: the recent window next to all time."""
    data = stats_data(settings, window)
    label = f"last {data['window_hours']:g}h"
    tables: list[Table] = []

    if "overall" in data:
        t = Table(title="Scores")
        t.add_column("period")
        for c in _AVERAGE_COLUMNS:
            t.add_column(c, justify="right")
        t.add_row(label, *_averages_row(data["overall"]["window"]))
        t.add_row("all time", *_averages_row(data["overall"]["all"]))
        tables.append(t)
        # one row per (key, period), so a table keeps to six columns and fits an 80-column terminal
        for group, title in (("model_id", "model"), ("prompt_variant", "prompt variant"), ("role", "role")):
            t = Table(title=f"Per {title}")
            t.add_column(title, overflow="fold")
            t.add_column("period")
            for c in _AVERAGE_COLUMNS:
                t.add_column(c, justify="right")
            for row in data["by"][group]:
                key = row["key"] if row["key"] is not None else "(none)"
                t.add_row(key, label, *_averages_row(row["window"]))
                t.add_row("", "all time", *_averages_row(row["all"]), end_section=True)
            tables.append(t)

    if "anonymized" in data:
        t = Table(title="Anonymization")
        t.add_column("what")
        t.add_column(label, justify="right")
        t.add_column("all time", justify="right")
        for event_type, n in data["anonymized"].items():
            t.add_row(event_type, str(n["window"]), str(n["all"]))
        for kind, n in data["scrubbed"].items():
            t.add_row(f"scrubbed {kind}", str(n["window"]), str(n["all"]))
        tables.append(t)

    if "rejected" in data:
        t = Table(title="Rejected events")
        t.add_column("processor")
        t.add_column(label, justify="right")
        t.add_column("all time", justify="right")
        t.add_column("latest reason", overflow="fold")
        for row in data["rejected"]:
            t.add_row(row["processor"], str(row["window"]), str(row["all"]), row["last_reason"])
        tables.append(t)

    if data.get("arms"):
        t = Table(title="Bandit arms")
        for c in ("role", "decision", "arm"):
            t.add_column(c)
        for c in ("rewarded pulls", "mean reward", "selected"):
            t.add_column(c, justify="right")
        for a in data["arms"]:
            t.add_row(
                a["role"],
                a["decision"],
                a["arm"],
                str(a["pulls"]),
                _num(a["mean_reward"], ".3f"),
                str(a["selected"]),
            )
        tables.append(t)

    if data["missing"]:
        t = Table(title="Not built yet")
        t.add_column("projection")
        t.add_column("how to build it")
        for name in data["missing"]:
            t.add_row(name, "run the engine (`flywheel up`) or `flywheel replay`")
        tables.append(t)
    return tables
