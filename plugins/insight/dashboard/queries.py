"""What each dashboard page shows, read from the ``dashboard`` projection (``plugins/dashboard_view.py``).

The SQLite file is opened read-only for every request (``mode=ro``), so the dashboard never
writes, never holds a lock the engine waits on, and works beside a ``flywheel up`` in another
process on the same state folder. Before the projection has folded anything the pages are
empty, not broken. Every answer is plain JSON: the browser draws the plots and tables.
"""

from __future__ import annotations

import sqlite3
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson

#: the projection the dashboard reads (``plugins.dashboard_view.NAME`` registers it under this name)
PROJECTION_NAME = "dashboard"
#: the pages, in the order of the navigation bar: (path segment, title)
PAGES: tuple[tuple[str, str], ...] = (
    ("overview", "Overview"),
    ("datasets", "Datasets"),
    ("training", "Training"),
    ("evaluations", "Evaluations"),
    ("deployments", "Deployments"),
    ("rejections", "Rejections"),
)
#: the reward plots' dots: the most recent assessments (more is unreadable, slow and heavy)
MAX_DOTS = 3000
#: the reward plots' lines: hourly means, the most recent hours of each series (about three months)
MAX_HOURS = 2000
#: the model bucket of assessments that name none (as ``plugins.dashboard_view.UNKNOWN_MODEL``)
UNKNOWN = "(unknown)"

Row = dict[str, Any]


def projection_file(state_dir: Path) -> Path:
    return state_dir / "projections" / f"{PROJECTION_NAME}.sqlite"


def _loads(text: str) -> Any:
    return orjson.loads(text)


class DashboardData:
    """The pages' data, from one projection file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection | None]:
        if not self.path.exists():
            yield None
            return
        db = sqlite3.connect(
            f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=5.0, isolation_level=None
        )
        db.row_factory = sqlite3.Row
        try:
            yield db
        finally:
            db.close()

    @staticmethod
    def _rows(db: sqlite3.Connection, sql: str, *args: Any) -> list[Row]:
        return [dict(r) for r in db.execute(sql, args).fetchall()]

    def position(self) -> int:
        """The last log sequence the projection folded (0 before it exists)."""
        with self._db() as db:
            if db is None:
                return 0
            try:
                row = db.execute("SELECT seq FROM _position").fetchone()
            except sqlite3.OperationalError:  # created but not yet initialised by the engine
                return 0
            return int(row[0]) if row else 0

    def page(self, name: str) -> dict[str, Any]:
        """One page's data, with the log position it reflects."""
        if name not in {p for p, _ in PAGES}:
            raise KeyError(name)
        with self._db() as db:
            if db is None:
                return {"page": name, "position": 0, "empty": True}
            # one read transaction: the data and the position it reflects come from the same snapshot,
            # so a page never claims a position whose events it does not show yet
            db.execute("BEGIN")
            try:
                position = int(db.execute("SELECT seq FROM _position").fetchone()[0])
                body = getattr(self, f"_{name}")(db)
            except sqlite3.OperationalError:  # the engine has created the file but not its tables yet
                body, position = {"empty": True}, 0
            finally:
                db.execute("ROLLBACK")
        return {"page": name, "position": position, **body}

    # ------------------------------------------------------------------ overview

    def _overview(self, db: sqlite3.Connection) -> dict[str, Any]:
        hourly = self._rows(db, "SELECT hour, role, count FROM interactions_hourly ORDER BY hour, role")
        per_role: dict[str, dict[str, list[Any]]] = defaultdict(lambda: {"x": [], "y": []})
        for r in hourly:
            per_role[r["role"]]["x"].append(r["hour"])
            per_role[r["role"]]["y"].append(r["count"])
        points = self._rows(
            db,
            "SELECT * FROM (SELECT time, role, model_id, reward FROM assessments ORDER BY time DESC LIMIT ?)"
            " ORDER BY time",
            MAX_DOTS,
        )
        hourly_rewards = self._rows(
            db,
            "SELECT dimension, key, hour, n, total FROM reward_hourly WHERE n > 0 ORDER BY dimension, key, hour",
        )
        summary = db.execute(
            "SELECT (SELECT COALESCE(SUM(count), 0) FROM interactions_hourly),"
            " (SELECT COALESCE(SUM(n), 0) FROM reward_hourly WHERE dimension = 'role'),"
            " (SELECT SUM(total) / SUM(n) FROM reward_hourly WHERE dimension = 'role'),"
            " (SELECT COUNT(*) FROM datasets), (SELECT COUNT(*) FROM runs),"
            " (SELECT COUNT(*) FROM evaluations WHERE passed = 1), (SELECT COUNT(*) FROM evaluations),"
            " (SELECT COUNT(*) FROM evaluations WHERE verdict = 'inconclusive'),"
            " (SELECT COUNT(*) FROM timeline WHERE kind = 'deployed'),"
            " (SELECT COUNT(*) FROM timeline WHERE kind = 'rolled back'), (SELECT COUNT(*) FROM rejections)"
        ).fetchone()
        keys = ("interactions", "assessed", "mean_reward", "datasets", "runs", "evaluations_passed",
                "evaluations", "evaluations_inconclusive", "deployments", "rollbacks", "rejections")
        totals = dict(zip(keys, summary, strict=True))
        if totals["mean_reward"] is not None:
            totals["mean_reward"] = round(totals["mean_reward"], 3)
        return {
            "totals": totals,
            "interactions_per_hour": [{"name": role, **xy} for role, xy in sorted(per_role.items())],
            "reward_by_role": _reward_series(points, "role", hourly_rewards),
            "reward_by_model": _reward_series(points, "model", hourly_rewards),
            "arms": self._arms(db),
        }

    def _arms(self, db: sqlite3.Connection) -> list[Row]:
        """Each arm's share of its selector's choices, next to its pulls and mean reward."""
        arms: dict[tuple[str, str, str], Row] = {}
        for r in self._rows(db, "SELECT role, decision, arm, selected FROM arm_choices"):
            arms[(r["role"], r["decision"], r["arm"])] = {**r, "pulls": 0, "mean_reward": None}
        for r in self._rows(db, "SELECT role, decision, arm, pulls, reward_sum FROM arm_rewards WHERE pulls > 0"):
            row = arms.setdefault(
                (r["role"], r["decision"], r["arm"]),
                {"role": r["role"], "decision": r["decision"], "arm": r["arm"], "selected": 0},
            )
            row["pulls"], row["mean_reward"] = r["pulls"], round(r["reward_sum"] / r["pulls"], 3)
        totals: dict[tuple[str, str], int] = defaultdict(int)
        for (role, decision, _), row in arms.items():
            totals[(role, decision)] += row["selected"]
        for (role, decision, _), row in arms.items():
            total = totals[(role, decision)]
            row["share"] = round(row["selected"] / total, 4) if total else None
        return sorted(arms.values(), key=lambda r: (r["role"], r["decision"], -r["selected"], r["arm"]))

    # ------------------------------------------------------------------ datasets

    def _datasets(self, db: sqlite3.Connection) -> dict[str, Any]:
        runs = self._rows(db, "SELECT run_id, dataset_hash, status, adapter_hash FROM runs")
        verdicts = {r["run_id"]: r["verdict"] for r in self._rows(
            db, "SELECT run_id, verdict FROM evaluations ORDER BY seq")}
        deployed = {r["adapter_hash"] for r in self._rows(
            db, "SELECT adapter_hash FROM timeline WHERE kind = 'deployed' AND adapter_hash IS NOT NULL")}
        datasets = []
        for r in self._rows(db, "SELECT * FROM datasets ORDER BY seq DESC"):
            r["sizes"], r["balance"] = _loads(r["sizes"]), _loads(r["balance"])
            r["runs"] = [
                {"run_id": run["run_id"], "status": run["status"], "adapter_hash": run["adapter_hash"],
                 "verdict": verdicts.get(run["run_id"]), "deployed": run["adapter_hash"] in deployed}
                for run in runs if run["dataset_hash"] == r["dataset_hash"]
            ]
            datasets.append(r)
        skips = self._rows(db, "SELECT * FROM dataset_skips ORDER BY seq DESC LIMIT 200")
        return {"datasets": datasets, "skips": skips}

    # ------------------------------------------------------------------ training

    def _training(self, db: sqlite3.Connection) -> dict[str, Any]:
        runs = self._rows(db, "SELECT * FROM runs ORDER BY COALESCE(started, finished, '') DESC, run_id")
        curves: dict[str, Row] = {}
        for p in self._rows(db, "SELECT run_id, step, loss, val_loss FROM run_points ORDER BY run_id, step"):
            c = curves.setdefault(p["run_id"], {"run_id": p["run_id"], "step": [], "loss": [],
                                                "val_step": [], "val_loss": []})
            if p["loss"] is not None:
                c["step"].append(p["step"])
                c["loss"].append(p["loss"])
            if p["val_loss"] is not None:
                c["val_step"].append(p["step"])
                c["val_loss"].append(p["val_loss"])
        for run in runs:
            if run["run_id"] in curves:
                curves[run["run_id"]]["role"] = run["role"]
        roles = [r["role"] for r in self._rows(
            db, "SELECT role FROM interactions_hourly UNION SELECT role FROM runs WHERE role IS NOT NULL"
            " UNION SELECT key FROM reward_hourly WHERE dimension = 'role' ORDER BY role")]
        return {"runs": runs, "curves": [curves[r["run_id"]] for r in runs if r["run_id"] in curves], "roles": roles}

    # ------------------------------------------------------------------ evaluations

    def _evaluations(self, db: sqlite3.Connection) -> dict[str, Any]:
        rows = []
        for r in self._rows(db, "SELECT * FROM evaluations ORDER BY seq DESC LIMIT 500"):
            candidate, baseline = _loads(r.pop("candidate")), _loads(r.pop("baseline"))
            r["passed"], r["reasons"], r["checks"] = bool(r["passed"]), _loads(r["reasons"]), _loads(r["checks"])
            r["metrics"] = []
            for k in sorted(set(candidate) | set(baseline)):
                delta = _delta(candidate.get(k), baseline.get(k))
                r["metrics"].append({"name": k, "candidate": candidate.get(k), "baseline": baseline.get(k),
                                     "delta": delta, "better": better(k, delta)})
            rows.append(r)
        return {"evaluations": rows}

    # ------------------------------------------------------------------ deployments

    def _deployments(self, db: sqlite3.Connection) -> dict[str, Any]:
        events = self._rows(db, "SELECT * FROM timeline ORDER BY seq")
        current: dict[str, Row] = {}
        for e in events:
            if e["kind"] in ("deployed", "rolled back"):
                current[e["role"]] = e
        return {"timeline": events[::-1], "current": [current[k] for k in sorted(current)]}

    # ------------------------------------------------------------------ rejections

    def _rejections(self, db: sqlite3.Connection) -> dict[str, Any]:
        rows = self._rows(db, "SELECT * FROM rejections ORDER BY seq DESC LIMIT 500")
        by_processor = self._rows(
            db, "SELECT processor, COUNT(*) AS count FROM rejections GROUP BY processor ORDER BY count DESC"
        )
        total = db.execute("SELECT COUNT(*) FROM rejections").fetchone()[0]
        return {"rejections": rows, "by_processor": by_processor, "total": total}


def _reward_series(points: list[Row], dimension: str, hourly: list[Row]) -> list[Row]:
    """One series per role (or model): the latest assessments' rewards as dots, and the mean reward
    of every hour (all time, the last ``MAX_HOURS``) as the line."""
    column = "role" if dimension == "role" else "model_id"
    series: dict[str, Row] = {}

    def of(name: str) -> Row:
        return series.setdefault(name, {"name": name, "x": [], "y": [], "hour": [], "mean": [], "n": []})

    for p in points:
        s = of(p[column] or UNKNOWN)
        s["x"].append(p["time"])
        s["y"].append(p["reward"])
    for h in hourly:
        if h["dimension"] == dimension:
            s = of(h["key"])
            s["hour"].append(h["hour"])
            s["mean"].append(round(h["total"] / h["n"], 4))
            s["n"].append(h["n"])
    for s in series.values():
        s["hour"], s["mean"], s["n"] = s["hour"][-MAX_HOURS:], s["mean"][-MAX_HOURS:], s["n"][-MAX_HOURS:]
    return [series[name] for name in sorted(series)]


#: figures for which a lower value is the better one (a loss, a latency, forgetting, leaks, memory)
LOWER_IS_BETTER = ("loss", "ms_per_token", "forgetting", "leaks", "rss", "_mb", "p_value")


def better(name: str, delta: float | None) -> int | None:
    """+1 when the candidate's change of figure ``name`` is an improvement, -1 when it is worse,
    0 for no change, None for a difference that is not a figure's (a count of items, a text)."""
    if delta is None or name.endswith(("_examples", "_items", "_problems", "_prompts", "_seed")):
        return None
    if delta == 0:
        return 0
    lower = any(part in name for part in LOWER_IS_BETTER)
    return (1 if delta < 0 else -1) if lower else (1 if delta > 0 else -1)


def _delta(candidate: Any, baseline: Any) -> float | None:
    numbers = (int, float)
    if isinstance(candidate, numbers) and isinstance(baseline, numbers) and not isinstance(candidate, bool):
        return round(float(candidate) - float(baseline), 6)
    return None
