"""What is in service, per role: the deployment book, a fold of the log's deployment events.

The book knows, per role, the version in service (model name, adapter, runtime, endpoint, traffic share), the
version that still serves the rest of the traffic while a canary runs, the versions kept for rollback, each
version's predecessor (the rollback chain), the evaluations that passed, the versions withdrawn because they were
trained on forgotten data (``adapter.superseded``: never a rollback target again), and the history of
deployments, failures, rollbacks and drift alarms.

The same fold serves three readers, each with its own copy so that each decides on exactly the events before
the one it handles:

- the ``deployments`` projection (serving), read by ``flywheel deployments`` and the gateway;
- the ``deployer`` processor, which folds its own decisions into its copy as it makes them;
- the ``drift_monitor`` processor, which needs the version in service and the one before it;
- the evaluator, which compares a candidate with the version in service at its own log position
  (``book_at``).

Before a role's first deployment its base model is in service under the name ``<role>-base`` (no adapter);
rolling back the first deployed version puts the base model back.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from flywheel_loop.schemas import (
    AdapterSuperseded,
    CanaryPassed,
    DeploymentCompleted,
    DeploymentFailed,
    DeploymentRolledBack,
    DriftDetected,
    EvaluationCompleted,
    Event,
    RollbackRequested,
)

__all__ = [
    "BOOK_EVENTS",
    "TABLES",
    "DeploymentBook",
    "HistoryEntry",
    "Service",
    "Version",
    "base_name",
    "book_at",
    "version_name",
]

BOOK_EVENTS = (
    "adapter.superseded",
    "canary.passed",
    "evaluation.completed",
    "deployment.completed",
    "deployment.failed",
    "deployment.rolled_back",
    "drift.detected",
    "rollback.requested",
)

TABLES = """
CREATE TABLE IF NOT EXISTS versions (
    role TEXT NOT NULL, model_name TEXT NOT NULL, adapter_hash TEXT, runtime TEXT NOT NULL,
    evaluation_id TEXT, previous_model_name TEXT, previous_adapter_hash TEXT,
    deployed_id TEXT NOT NULL, deployed_seq INTEGER NOT NULL, deployed_at TEXT NOT NULL,
    kept INTEGER NOT NULL DEFAULT 1, rolled_back INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (role, model_name));
CREATE TABLE IF NOT EXISTS service (
    role TEXT PRIMARY KEY, model_name TEXT NOT NULL, adapter_hash TEXT, runtime TEXT NOT NULL,
    endpoint TEXT, traffic_share REAL NOT NULL, sharing_with TEXT,
    since_id TEXT NOT NULL, since_seq INTEGER NOT NULL, since TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS evaluations (
    event_id TEXT PRIMARY KEY, role TEXT NOT NULL, adapter_hash TEXT, passed INTEGER NOT NULL,
    run_id TEXT NOT NULL, seq INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS evaluations_by_adapter ON evaluations (adapter_hash, passed);
CREATE TABLE IF NOT EXISTS history (
    seq INTEGER NOT NULL, event_id TEXT PRIMARY KEY, role TEXT NOT NULL, kind TEXT NOT NULL,
    model_name TEXT, to_model_name TEXT, detail TEXT NOT NULL, time TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS history_by_role ON history (role, seq);
CREATE TABLE IF NOT EXISTS withdrawn (
    role TEXT NOT NULL, adapter_hash TEXT NOT NULL, event_id TEXT NOT NULL, seq INTEGER NOT NULL,
    PRIMARY KEY (role, adapter_hash));
"""


def version_name(role: str, adapter_hash: str | None) -> str:
    """The name a version is served under: ``<role>-<first 12 hex digits of its adapter>``."""
    return base_name(role) if adapter_hash is None else f"{role}-{adapter_hash[:12]}"


def base_name(role: str) -> str:
    """The name of a role's base model (no adapter), in service before its first deployment."""
    return f"{role}-base"


@dataclass(frozen=True)
class Service:
    """The version in service for a role."""

    role: str
    model_name: str
    adapter_hash: str | None
    runtime: str
    endpoint: str | None
    traffic_share: float
    #: the previous version, still serving ``1 - traffic_share`` of the traffic while a canary runs
    sharing_with: str | None
    #: the event that put it in service (a deployment or a rollback), its sequence and time
    since_id: str
    since_seq: int
    since: str


@dataclass(frozen=True)
class Version:
    """A version that was deployed for a role."""

    role: str
    model_name: str
    adapter_hash: str | None
    runtime: str
    evaluation_id: str | None
    previous_model_name: str | None
    previous_adapter_hash: str | None
    deployed_id: str
    deployed_seq: int
    deployed_at: str
    kept: bool
    rolled_back: bool


@dataclass(frozen=True)
class HistoryEntry:
    seq: int
    event_id: str
    role: str
    kind: str
    model_name: str | None
    to_model_name: str | None
    detail: str
    time: str


class DeploymentBook:
    """The deployment state in one SQLite connection; ``apply`` folds an event (inside the caller's
    transaction), the other methods read."""

    def __init__(self, db: sqlite3.Connection, create: bool = True) -> None:
        self.db = db
        if create:  # executescript commits: never inside a caller's transaction
            db.executescript(TABLES)

    # ------------------------------------------------------------------ the fold

    def apply(self, event: Event[Any], seq: int) -> None:
        data, at = event.data, event.time.isoformat()
        if isinstance(data, EvaluationCompleted):
            self.db.execute(
                "INSERT OR REPLACE INTO evaluations VALUES (?, ?, ?, ?, ?, ?)",
                (event.id, data.role, data.adapter_hash, int(data.passed), data.run_id, seq),
            )
        elif isinstance(data, DeploymentCompleted):
            self._deployed(event.id, seq, at, data)
        elif isinstance(data, DeploymentRolledBack):
            self._rolled_back(event.id, seq, at, data)
        elif isinstance(data, DeploymentFailed):
            self._history(seq, event.id, data.role, "failed", data.model_name, None, data.reason, at)
        elif isinstance(data, DriftDetected):
            detail = (
                f"{data.metric} {data.baseline_value:.3f} -> {data.current_value:.3f} over {data.window} runs"
                + (f" (p={data.p_value:.3g})" if data.p_value is not None else "")
            )
            self._history(seq, event.id, data.role, "drift", data.model_name, data.previous_model_name, detail, at)
        elif isinstance(data, CanaryPassed):
            detail = f"{data.metric} {data.current_value:.3f} vs {data.baseline_value:.3f} over {data.window} runs"
            self._history(seq, event.id, data.role, "canary_passed", data.model_name, data.previous_model_name,
                          detail, at)
        elif isinstance(data, RollbackRequested):
            self._history(seq, event.id, data.role, "rollback_requested", None, None, data.reason, at)
        elif isinstance(data, AdapterSuperseded):
            self.db.execute("INSERT OR IGNORE INTO withdrawn VALUES (?, ?, ?, ?)",
                            (data.role, data.adapter_hash, event.id, seq))
            name = data.model_name or version_name(data.role, data.adapter_hash)
            self._history(seq, event.id, data.role, f"superseded ({data.action})", name, None, data.detail, at)

    def _deployed(self, event_id: str, seq: int, at: str, data: DeploymentCompleted) -> None:
        role = data.role
        before = self.service(role)  # the same version again: a canary promoted to all the traffic
        self.db.execute(
            "INSERT INTO versions (role, model_name, adapter_hash, runtime, evaluation_id, previous_model_name,"
            " previous_adapter_hash, deployed_id, deployed_seq, deployed_at, kept, rolled_back)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1, 0) ON CONFLICT (role, model_name) DO UPDATE SET"
            " adapter_hash = excluded.adapter_hash, runtime = excluded.runtime,"
            " evaluation_id = excluded.evaluation_id, previous_model_name = excluded.previous_model_name,"
            " previous_adapter_hash = excluded.previous_adapter_hash, deployed_id = excluded.deployed_id,"
            " deployed_seq = excluded.deployed_seq, deployed_at = excluded.deployed_at, kept = 1, rolled_back = 0",
            (role, data.model_name, data.adapter_hash, data.runtime, data.evaluation_id, data.previous_model_name,
             data.previous_adapter_hash, event_id, seq, at),
        )
        if data.kept:
            marks = ",".join("?" * len(data.kept))
            self.db.execute(
                f"UPDATE versions SET kept = (model_name IN ({marks})) WHERE role = ?", (*data.kept, role)
            )
        sharing = data.previous_model_name if data.traffic_share < 1.0 else None
        self._serve(role, data.model_name, data.adapter_hash, data.runtime, data.endpoint, data.traffic_share,
                    sharing, event_id, seq, at)
        detail = f"{data.runtime}, {data.traffic_share:.0%} of traffic" + (
            f", replacing {data.previous_model_name}" if data.previous_model_name else ""
        )
        kind = "promoted" if before is not None and before.model_name == data.model_name else "deployed"
        self._history(seq, event_id, role, kind, data.model_name, data.previous_model_name, detail, at)

    def _rolled_back(self, event_id: str, seq: int, at: str, data: DeploymentRolledBack) -> None:
        role = data.role
        source = data.from_model_name or version_name(role, data.from_adapter)
        target = data.to_model_name or version_name(role, data.to_adapter)
        self.db.execute(
            "UPDATE versions SET rolled_back = 1, kept = 0 WHERE role = ? AND model_name = ?", (role, source)
        )
        self._serve(role, target, data.to_adapter, data.runtime, data.endpoint, 1.0, None, event_id, seq, at)
        kind = f"rolled_back ({data.trigger})" if data.trigger else "rolled_back"
        self._history(seq, event_id, role, kind, source, target, data.reason, at)

    def _serve(self, role: str, name: str, adapter: str | None, runtime: str, endpoint: str | None,
               share: float, sharing: str | None, event_id: str, seq: int, at: str) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO service VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (role, name, adapter, runtime, endpoint, share, sharing, event_id, seq, at),
        )

    def _history(self, seq: int, event_id: str, role: str, kind: str, name: str | None, to: str | None,
                 detail: str, at: str) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO history VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (seq, event_id, role, kind, name, to, detail, at),
        )

    # ------------------------------------------------------------------ reads

    def roles(self) -> list[str]:
        rows = self.db.execute(
            "SELECT role FROM service UNION SELECT role FROM history UNION SELECT role FROM versions ORDER BY 1"
        ).fetchall()
        return [r[0] for r in rows]

    def service(self, role: str) -> Service | None:
        row = self.db.execute(
            "SELECT role, model_name, adapter_hash, runtime, endpoint, traffic_share, sharing_with, since_id,"
            " since_seq, since FROM service WHERE role = ?",
            (role,),
        ).fetchone()
        return Service(*row) if row else None

    def services(self) -> list[Service]:
        return [s for r in self.roles() if (s := self.service(r)) is not None]

    def version(self, role: str, model_name: str) -> Version | None:
        row = self.db.execute(f"SELECT {_VERSION_COLUMNS} FROM versions WHERE role = ? AND model_name = ?",
                              (role, model_name)).fetchone()
        return _version(row) if row else None

    def versions(self, role: str) -> list[Version]:
        """Every version deployed for ``role``, newest first."""
        rows = self.db.execute(
            f"SELECT {_VERSION_COLUMNS} FROM versions WHERE role = ? ORDER BY deployed_seq DESC", (role,)
        ).fetchall()
        return [_version(r) for r in rows]

    def kept(self, role: str) -> list[Version]:
        """The versions kept for rollback, newest first (the one in service included; none withdrawn)."""
        return [v for v in self.versions(role)
                if v.kept and not v.rolled_back and not self.withdrawn(role, v.adapter_hash)]

    def withdrawn(self, role: str, adapter_hash: str | None) -> bool:
        """Whether the adapter was trained on forgotten data (an ``adapter.superseded`` named it)."""
        if adapter_hash is None:
            return False
        row = self.db.execute("SELECT 1 FROM withdrawn WHERE role = ? AND adapter_hash = ?",
                              (role, adapter_hash)).fetchone()
        return row is not None

    def previous(self, role: str) -> tuple[str, str | None] | None:
        """(model name, adapter hash) of the version before the one in service: where a rollback goes. Versions
        withdrawn for forgotten data are passed over (the one before them, and so on, down to the base model).

        None when nothing is in service, or when the base model is (there is nothing before it)."""
        current = self.service(role)
        if current is None or current.adapter_hash is None:
            return None
        version = self.version(role, current.model_name)
        seen = {current.model_name}
        while version is not None and version.previous_model_name is not None:
            name, adapter = version.previous_model_name, version.previous_adapter_hash
            if name in seen:
                break  # a chain that comes back on itself (a version deployed again later)
            seen.add(name)
            if not self.withdrawn(role, adapter):
                return name, adapter
            version = self.version(role, name)
        return base_name(role), None

    def passed_evaluation(self, adapter_hash: str) -> str | None:
        """The id of the latest evaluation that passed ``adapter_hash``, or None."""
        row = self.db.execute(
            "SELECT event_id FROM evaluations WHERE adapter_hash = ? AND passed = 1 ORDER BY seq DESC LIMIT 1",
            (adapter_hash,),
        ).fetchone()
        return str(row[0]) if row else None

    def history(self, role: str | None = None, limit: int = 50) -> list[HistoryEntry]:
        """Deployments, failures, rollbacks and drift alarms, newest first."""
        where, args = ("WHERE role = ?", (role,)) if role else ("", ())
        rows = self.db.execute(
            f"SELECT seq, event_id, role, kind, model_name, to_model_name, detail, time FROM history {where}"
            " ORDER BY seq DESC LIMIT ?",
            (*args, limit),
        ).fetchall()
        return [HistoryEntry(*r) for r in rows]


_VERSION_COLUMNS = (
    "role, model_name, adapter_hash, runtime, evaluation_id, previous_model_name, previous_adapter_hash,"
    " deployed_id, deployed_seq, deployed_at, kept, rolled_back"
)


def _version(row: tuple[Any, ...]) -> Version:
    role, name, adapter, runtime, evaluation, previous, previous_adapter, deployed_id, seq, at, kept, back = row
    return Version(role, name, adapter, runtime, evaluation, previous, previous_adapter, deployed_id, seq, at,
                   kept=bool(kept), rolled_back=bool(back))


def book_at(events: Iterable[tuple[int, Event[Any]]]) -> DeploymentBook:
    """A book in memory folded from ``(sequence, event)`` pairs (e.g. ``ctx.read_log(BOOK_EVENTS, until)``)."""
    book = DeploymentBook(sqlite3.connect(":memory:", check_same_thread=False))
    for seq, event in events:
        book.apply(event, seq)
    return book
