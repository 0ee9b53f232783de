"""Built-in processor ``drift_monitor``: raises ``drift.detected`` when the version in service earns less
production reward than the version before it, and ``canary.passed`` when a canary earns no less.

It consumes ``quality.assessed`` (the reward of each run, keyed by the run's interaction and credited to its
``model_id``: the version the gateway recorded serving the call, or, for interactions an agent recorded itself,
the deployment's ``model_name`` the agent reports as its model id) and the deployment events (which
version is in service per role, and which one came before it).

For the version in service, once it has ``drift.window`` (20) rewards since it went into service, the monitor
compares its last ``window`` rewards with the last ``window`` rewards of the previous version (before a role's
first deployment: the role's last ``window`` rewards before it went into service, whatever model earned them).
Drift is a mean reward at least ``drift.min_drop`` (5 %) lower, relative to the previous version's, that a
one-sided Mann-Whitney U test (``scipy.stats.mannwhitneyu``, alternative "less") finds significant at
``drift.alpha`` (0.05): a drop that is both large enough to matter and unlikely to be noise, with no assumption
about how rewards are distributed. It is raised once per time a version goes into service; the deployer rolls
the version back and the training trigger may request a new run (``curation.trigger.on_drift``).

A canary (``deployer.canary_share`` below 1: the new version takes that share, the previous one the rest) whose
full window shows no drift gets ``canary.passed`` instead, and the deployer moves all the traffic to it (a new
``deployment.completed``, after which the promoted version is watched again from a fresh window).

A re-emitted score for the same interaction replaces the old one. The rewards, the book and the verdicts are a
fold of the log every drift process keeps (``flywheel_loop.engine.state``), and the verdict is part of the fold:
whichever process handles an input, the answer is the same, and it is on the log once.
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass
from typing import Any

from flywheel_loop.engine.config import Settings
from flywheel_loop.engine.processor import Processor, decided
from flywheel_loop.plugins.serving.settings import DriftConfig
from flywheel_loop.plugins.shared.deployment_book import TABLES as BOOK_TABLES
from flywheel_loop.plugins.shared.deployment_book import DeploymentBook
from flywheel_loop.schemas import CanaryPassed, DriftDetected, Event, QualityAssessed

__all__ = ["NAME", "Comparison", "DriftMonitor", "DriftState", "compare"]

log = logging.getLogger(__name__)

NAME = "drift_monitor"
CONSUMES = ("quality.assessed", "deployment.completed", "deployment.rolled_back")

TABLES = """
CREATE TABLE IF NOT EXISTS rewards (
    interaction_id TEXT PRIMARY KEY, role TEXT NOT NULL, model_id TEXT, reward REAL NOT NULL,
    seq INTEGER NOT NULL, event_id TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS rewards_by_model ON rewards (role, model_id, seq);
CREATE INDEX IF NOT EXISTS rewards_by_role ON rewards (role, seq);
CREATE TABLE IF NOT EXISTS verdicts (since_id TEXT PRIMARY KEY, role TEXT NOT NULL, event_id TEXT NOT NULL);
"""


@dataclass(frozen=True)
class Comparison:
    baseline_mean: float
    current_mean: float
    #: (baseline - current) / baseline
    drop: float
    #: one-sided Mann-Whitney U (current < baseline); None when the drop is too small to test
    p_value: float | None
    drifted: bool


def compare(current: list[float], baseline: list[float], cfg: DriftConfig) -> Comparison:
    """Is the ``current`` window of rewards worse than the ``baseline`` one, by enough and beyond chance?"""
    from scipy.stats import mannwhitneyu

    base_mean = sum(baseline) / len(baseline)
    cur_mean = sum(current) / len(current)
    drop = (base_mean - cur_mean) / base_mean if base_mean > 0 else 0.0
    if drop < cfg.min_drop:
        return Comparison(base_mean, cur_mean, drop, None, False)
    p_value = min(max(float(mannwhitneyu(current, baseline, alternative="less").pvalue), 0.0), 1.0)
    return Comparison(base_mean, cur_mean, drop, p_value, p_value < cfg.alpha)


class DriftState:
    """Rewards per (role, model), the deployment book and the verdicts given: tables the
    processor's fold keeps."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.book = DeploymentBook(db, create=False)

    def apply(self, event: Event[Any], seq: int, cfg: DriftConfig) -> DriftDetected | CanaryPassed | None:
        """Fold one event in; return the verdict it causes, if any (the caller holds the transaction)."""
        data = event.data
        if not isinstance(data, QualityAssessed):
            self.book.apply(event, seq)
            return None
        self.db.execute(
            "INSERT INTO rewards VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (interaction_id) DO UPDATE SET"
            " role = excluded.role, model_id = excluded.model_id, reward = excluded.reward, seq = excluded.seq,"
            " event_id = excluded.event_id",
            (data.interaction_id, data.role, data.model_id, data.reward, seq, event.id),
        )
        return self.check(data.role, cfg)

    def check(self, role: str, cfg: DriftConfig) -> DriftDetected | CanaryPassed | None:
        """A verdict on the version in service once its window is full: drift, a canary that passed, or none."""
        service = self.book.service(role)
        if service is None or service.adapter_hash is None:
            return None  # nothing deployed yet, or the base model: there is nothing to go back to
        if self.db.execute("SELECT 1 FROM verdicts WHERE since_id = ?", (service.since_id,)).fetchone():
            return None  # one verdict per time a version goes into service
        current = self.db.execute(
            "SELECT reward, event_id FROM rewards WHERE role = ? AND model_id = ? AND seq > ?"
            " ORDER BY seq DESC LIMIT ?",
            (role, service.model_name, service.since_seq, cfg.window),
        ).fetchall()
        if len(current) < cfg.window:
            return None
        version = self.book.version(role, service.model_name)
        previous = version.previous_model_name if version else None
        if previous is not None:
            baseline = self.db.execute(
                "SELECT reward FROM rewards WHERE role = ? AND model_id = ? ORDER BY seq DESC LIMIT ?",
                (role, previous, cfg.window),
            ).fetchall()
        else:
            baseline = self.db.execute(
                "SELECT reward FROM rewards WHERE role = ? AND seq <= ? ORDER BY seq DESC LIMIT ?",
                (role, service.since_seq, cfg.window),
            ).fetchall()
        if len(baseline) < cfg.window:
            return None
        verdict = compare([r[0] for r in current], [r[0] for r in baseline], cfg)
        if not verdict.drifted:
            if service.traffic_share >= 1.0 or service.sharing_with is None:
                return None
            return CanaryPassed(
                role=role,
                model_name=service.model_name,
                previous_model_name=previous,
                deployment_id=service.since_id,
                window=cfg.window,
                baseline_value=round(verdict.baseline_mean, 6),
                current_value=round(verdict.current_mean, 6),
                p_value=verdict.p_value,
            )
        return DriftDetected(
            role=role,
            metric="reward_mean",
            window=cfg.window,
            baseline_value=round(verdict.baseline_mean, 6),
            current_value=round(verdict.current_mean, 6),
            drop=round(verdict.drop, 6),
            p_value=verdict.p_value,
            evidence=[r[1] for r in reversed(current)],
            model_name=service.model_name,
            previous_model_name=previous,
            deployment_id=service.since_id,
        )


class DriftMonitor:
    """The processor's fold: rewards, the book and the verdicts given, and the verdict each input
    causes (a pure policy: every process that folds the log decides the same at the same position)."""

    def __init__(self, settings: Settings) -> None:
        self.cfg = DriftConfig.of(settings)

    def fold(self, db: sqlite3.Connection, event: Event[Any], seq: int) -> list[DriftDetected | CanaryPassed]:
        state = DriftState(db)
        verdict = state.apply(event, seq, self.cfg)
        if verdict is None:
            return []
        state.db.execute("INSERT INTO verdicts VALUES (?, ?, ?)", (verdict.deployment_id, verdict.role, event.id))
        if isinstance(verdict, DriftDetected):
            log.warning(
                "drift for %s: %s reward %.3f -> %.3f (p=%.3g)", verdict.role, verdict.model_name,
                verdict.baseline_value, verdict.current_value, verdict.p_value or 0.0,
            )
        else:
            log.info("canary %s passed for %s: it may take all the traffic", verdict.model_name, verdict.role)
        return [verdict]


def processor(settings: Settings) -> Processor:
    """The drift processor, configured by ``settings``."""
    return Processor(
        name=NAME,
        consumes=CONSUMES,
        handle=decided,
        description="drift.detected when the version in service earns less reward than the one before it",
        produces=("drift.detected", "canary.passed"),
        stateful=True,
        tables=BOOK_TABLES + TABLES,
        fold=DriftMonitor(settings).fold,
        state_version=2,
    )
