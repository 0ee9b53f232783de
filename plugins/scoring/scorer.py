"""Built-in processor ``scoring``: anonymized evidence in, ``quality.assessed`` out.

It consumes ``interaction.anonymized``, ``feedback.anonymized`` and ``outcome.anonymized``
(never the raw stream) and asks every assessor (``register_assessors``, through
``AssessorPanel``) to score the evidence of the interaction, combines their answers, and emits a
``quality.assessed`` each time the result changes. Old scores are never rewritten; the
``scores`` projection keeps the latest.

**The evidence is a fold of the log.** Its tables (every interaction, feedback and outcome, with
the log position it arrived at) are the processor's state, which the engine folds from the log
on every process that runs ``scoring`` (``flywheel_loop.engine.state``): N scoring processes on N
machines share the inputs and see the same evidence, with no shared folder.

- **A score is a function of the log.** The input at log position S is scored on the evidence of
  its interaction up to S, and compared with the score of the evidence before it: a new
  ``quality.assessed`` exactly when the evidence at S changes the score. Whichever process handles
  an input, and however often, the answer is the same; its output is on the log once (derived ids,
  and an input whose output is on the log is not handled again).
- **Late and out-of-order evidence.** Feedback and outcomes count in log order whatever their
  times. Evidence on the log before its interaction is scored with the interaction, when the
  interaction arrives; evidence about an interaction that is not on the log at all raises
  ``UnknownInteraction``: the worker naks it with back-off, and after ``worker.max_attempts`` the
  runtime rejects it with the reason (an ``event.rejected`` naming the unknown interaction), so an
  outcome for an interaction that never appears is a clear rejection, not a silent drop.
- **Forgetting.** A ``data.forgotten`` deletes the evidence of the interactions it lists (their
  anonymized bodies, feedback, outcomes and cached scores) and keeps only their ids, so evidence
  about them that arrives later is dropped, not scored.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from flywheel_loop.engine.assessment import Evidence
from flywheel_loop.engine.config import Settings
from flywheel_loop.engine.processor import ProcessContext, Processor
from flywheel_loop.plugins.scoring.panel import AssessorPanel, Combined, combine
from flywheel_loop.plugins.scoring.settings import AssessmentConfig
from flywheel_loop.schemas import (
    DataForgotten,
    Event,
    FeedbackAnonymized,
    InteractionAnonymized,
    OutcomeAnonymized,
    Payload,
    QualityAssessed,
)

CONSUMES = ("interaction.anonymized", "feedback.anonymized", "outcome.anonymized", "data.forgotten")

TABLES = """
CREATE TABLE IF NOT EXISTS interactions (
    interaction_id TEXT PRIMARY KEY, event_id TEXT NOT NULL, seq INTEGER NOT NULL, body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS evidence (
    event_id TEXT PRIMARY KEY, interaction_id TEXT NOT NULL, kind TEXT NOT NULL, seq INTEGER NOT NULL,
    body BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS evidence_by_interaction ON evidence (interaction_id, seq);
CREATE TABLE IF NOT EXISTS scored (
    interaction_id TEXT NOT NULL, seq INTEGER NOT NULL, fingerprint BLOB, PRIMARY KEY (interaction_id, seq));
CREATE TABLE IF NOT EXISTS forgotten (interaction_id TEXT PRIMARY KEY);
"""


class UnknownInteraction(LookupError):
    """Feedback or an outcome for an interaction the scorer has not seen (yet)."""


def interaction_id_of(payload: Payload) -> str:
    """The interaction an ``*.anonymized`` payload is about."""
    if isinstance(payload, InteractionAnonymized):
        return payload.interaction_id
    if isinstance(payload, FeedbackAnonymized):
        return payload.feedback.interaction_id
    if isinstance(payload, OutcomeAnonymized):
        return payload.outcome.interaction_id
    raise TypeError(f"{type(payload).__name__} is not evidence about an interaction")


class EvidenceStore:
    """The evidence of every interaction (the folded tables), as of any log position."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    # ------------------------------------------------------------------ the fold

    def add(self, event: Event[Any], seq: int) -> None:
        """Fold one piece of evidence in at log position ``seq`` (idempotent by event id)."""
        data = event.data
        iid = interaction_id_of(data)
        if self.is_forgotten(iid):
            return  # evidence about a forgotten interaction: dropped
        body = data.model_dump_json().encode()
        if isinstance(data, InteractionAnonymized):
            self.db.execute(
                "INSERT INTO interactions VALUES (?, ?, ?, ?) ON CONFLICT (interaction_id) DO UPDATE SET"
                " event_id = excluded.event_id, seq = excluded.seq, body = excluded.body",
                (iid, event.id, seq, body),
            )
        else:
            kind = "feedback" if isinstance(data, FeedbackAnonymized) else "outcome"
            self.db.execute("INSERT OR IGNORE INTO evidence VALUES (?, ?, ?, ?, ?)", (event.id, iid, kind, seq, body))

    def forget(self, interaction_ids: list[str]) -> int:
        """Delete everything kept about these interactions; keep their ids so later evidence about
        them is dropped. Returns the interactions deleted."""
        ids = [(i,) for i in interaction_ids]
        before = self.db.total_changes
        self.db.executemany("DELETE FROM interactions WHERE interaction_id = ?", ids)
        deleted = self.db.total_changes - before
        self.db.executemany("DELETE FROM evidence WHERE interaction_id = ?", ids)
        self.db.executemany("DELETE FROM scored WHERE interaction_id = ?", ids)
        self.db.executemany("INSERT OR IGNORE INTO forgotten VALUES (?)", ids)
        return deleted

    # ------------------------------------------------------------------ reading

    def is_forgotten(self, interaction_id: str) -> bool:
        sql = "SELECT 1 FROM forgotten WHERE interaction_id = ?"
        return self.db.execute(sql, (interaction_id,)).fetchone() is not None

    def interaction_seq(self, interaction_id: str) -> int | None:
        """Where the interaction is on the log, or None when it is not (yet)."""
        row = self.db.execute("SELECT seq FROM interactions WHERE interaction_id = ?", (interaction_id,)).fetchone()
        return int(row[0]) if row else None

    def positions(self, interaction_id: str) -> list[int]:
        """The log positions of the interaction and of its evidence, in order."""
        rows = self.db.execute(
            "SELECT seq FROM interactions WHERE interaction_id = ? UNION SELECT seq FROM evidence"
            " WHERE interaction_id = ? ORDER BY 1",
            (interaction_id, interaction_id),
        )
        return [int(r[0]) for r in rows]

    def evidence(self, interaction_id: str, until: int) -> Evidence:
        """Everything known about the interaction up to log position ``until``."""
        event_id, body = self.db.execute(
            "SELECT event_id, body FROM interactions WHERE interaction_id = ?", (interaction_id,)
        ).fetchone()
        rows = self.db.execute(
            "SELECT event_id, kind, body FROM evidence WHERE interaction_id = ? AND seq <= ? ORDER BY event_id",
            (interaction_id, until),
        ).fetchall()
        parsed: dict[str, type[FeedbackAnonymized] | type[OutcomeAnonymized]] = {
            "feedback": FeedbackAnonymized, "outcome": OutcomeAnonymized,
        }
        items = [parsed[kind].model_validate_json(body) for _, kind, body in rows]
        feedback = tuple(i.feedback for i in items if isinstance(i, FeedbackAnonymized))
        outcomes = tuple(i.outcome for i in items if isinstance(i, OutcomeAnonymized))
        return Evidence(
            interaction_id=interaction_id,
            interaction=InteractionAnonymized.model_validate_json(body),
            feedback=feedback,
            outcomes=outcomes,
            event_ids=(event_id, *(r[0] for r in rows)),
        )

    def cached(self, interaction_id: str, seq: int) -> tuple[bool, bytes | None]:
        """(known, fingerprint) of the score at ``seq`` this process computed before."""
        row = self.db.execute(
            "SELECT fingerprint FROM scored WHERE interaction_id = ? AND seq = ?", (interaction_id, seq)
        ).fetchone()
        return (row is not None, row[0] if row else None)

    def cache(self, interaction_id: str, seq: int, fingerprint: bytes | None) -> None:
        """Keep the score at ``seq`` (a cache: recomputed from the evidence when missing)."""
        self.db.execute("INSERT OR REPLACE INTO scored VALUES (?, ?, ?)", (interaction_id, seq, fingerprint))


def fold(db: sqlite3.Connection, event: Event[Any], seq: int) -> None:
    """The scoring state: evidence in, forgotten interactions out."""
    store = EvidenceStore(db)
    if isinstance(event.data, DataForgotten):
        store.forget(event.data.interaction_ids)
    else:
        store.add(event, seq)


def quality_assessed(evidence: Evidence, combined: Combined) -> QualityAssessed:
    """The ``quality.assessed`` payload of a combined assessment of this evidence."""
    recorded = evidence.interaction.interaction
    return QualityAssessed(
        interaction_id=evidence.interaction_id,
        role=recorded.role,
        model_id=recorded.served_version,  # the gateway's word over the agent's, when it recorded the call
        prompt_variant=recorded.prompt_variant,
        complexity=recorded.complexity,
        domain=recorded.domain,
        cost_usd=recorded.cost_usd,
        duration_ms=recorded.duration_ms,
        scores=combined.scores,
        reward=combined.reward,
        confidence=combined.confidence,
        assessors=combined.assessors,
        evidence=list(evidence.event_ids),
        fallbacks=combined.fallbacks,
    )


def _failed_call(evidence: Evidence) -> bool:
    """A call the gateway recorded as failed (the upstream was down or refused it)."""
    call = evidence.interaction.interaction.gateway
    return call is not None and call.status == "failed"


class Scoring:
    """The processor: the assessor panel, and the step over the folded evidence."""

    def __init__(self) -> None:
        self.panel: AssessorPanel | None = None

    def handle(self, event: Event[Any], ctx: ProcessContext) -> list[QualityAssessed]:
        if isinstance(event.data, DataForgotten):
            return []  # the fold deleted the evidence
        store = EvidenceStore(ctx.state.db)
        iid = interaction_id_of(event.data)
        if store.is_forgotten(iid):
            return []  # evidence about a forgotten interaction: dropped
        arrived = store.interaction_seq(iid)
        if arrived is None:
            raise UnknownInteraction(
                f"{event.type} {event.id} is about interaction {iid}, which scoring has not seen"
                " (no interaction.anonymized for it on the log yet)"
            )
        at = ctx.sequence
        if arrived > at:
            return []  # evidence before its interaction: scored with the interaction, when it is handled
        if self.panel is None:
            if ctx.plugins is None:
                raise RuntimeError("scoring needs the plugin host (ProcessContext.plugins) to find its assessors")
            self.panel = AssessorPanel(ctx.plugins.assessors(), AssessmentConfig.of(ctx.settings))
        payload, fingerprint = self._score(store, iid, at, ctx)
        before = [s for s in store.positions(iid) if s < at and s >= arrived]
        previous = self._fingerprint(store, iid, before[-1], ctx) if before else None
        if fingerprint is None or fingerprint == previous:
            return []  # nothing to score, or the evidence at this position changed nothing
        return [payload] if payload is not None else []

    def _score(
        self, store: EvidenceStore, iid: str, at: int, ctx: ProcessContext
    ) -> tuple[QualityAssessed | None, bytes | None]:
        assert self.panel is not None
        evidence = store.evidence(iid, at)
        results = self.panel.assess(evidence)
        for r in results:
            if r.fallback:
                ctx.log.warning("assessor %s fell back (%s) on %s: %s", r.name, r.fallback, iid, r.reason)
        combined = combine(results, AssessmentConfig.of(ctx.settings))
        if _failed_call(evidence):
            combined = None  # the upstream never answered: nothing to score, nothing to learn from
        payload = quality_assessed(evidence, combined) if combined else None
        fingerprint = payload.model_dump_json(exclude={"evidence"}).encode() if payload else None
        store.cache(iid, at, fingerprint)
        return payload, fingerprint

    def _fingerprint(self, store: EvidenceStore, iid: str, at: int, ctx: ProcessContext) -> bytes | None:
        known, fingerprint = store.cached(iid, at)
        if known:
            return fingerprint
        return self._score(store, iid, at, ctx)[1]  # another process scored it: the same function, again


def processor(settings: Settings) -> Processor:
    """The scorer processor, configured by ``settings``."""
    return Processor(
        name="scoring",
        consumes=CONSUMES,
        handle=Scoring().handle,
        description="scores anonymized interactions with every assessor; re-scores on new evidence",
        produces=("quality.assessed",),
        stateful=True,
        tables=TABLES,
        fold=fold,
        state_version=2,
    )
