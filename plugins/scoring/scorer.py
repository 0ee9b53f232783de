"""Built-in processor ``scoring``: anonymized evidence in, ``quality.assessed`` out.

It consumes ``interaction.anonymized``, ``feedback.anonymized`` and ``outcome.anonymized``
(never the raw stream), keeps the evidence of each interaction in a SQLite file in its
state folder, asks every assessor (the ``assess`` hook, through ``AssessorPanel``) to score
the evidence, combines their answers, and emits a ``quality.assessed`` each time the result
changes. Old scores are never rewritten; the ``scores`` projection keeps the latest.

- **Redelivery changes nothing.** Evidence is upserted by event id, and the engine stores the
  output of each input event with it in one transaction: a redelivered input returns the same
  output (same derived id, so the log keeps one copy), even if the first publish failed
  after the commit.
- **Late and out-of-order evidence.** Feedback and outcomes are kept in event-id (time)
  order whatever order they arrive in. One that arrives before its interaction raises
  ``UnknownInteraction``: the worker naks it with back-off and it is scored when it comes
  back after the interaction arrived. The grace is the worker's retry schedule
  (``worker.max_attempts``, ``backoff_s`` doubling up to ``max_backoff_s``); after it, the
  runtime rejects the event with the reason (an ``event.rejected`` naming the unknown
  interaction), so an outcome for an interaction that never appears is a clear rejection,
  not a silent drop.

- **Forgetting.** A ``data.forgotten`` deletes the evidence of the interactions it lists
  (their anonymized bodies, feedback, outcomes, current scores and the recorded outputs) and
  keeps only their ids, so evidence about them that arrives later is dropped, not scored.

The evidence lives in the processor's state store, which the engine keeps and commits with
the output memo (``flywheel_loop.engine.state``).
"""

from __future__ import annotations

from typing import Any

from flywheel_loop.engine.assessment import Evidence
from flywheel_loop.engine.config import Settings
from flywheel_loop.engine.processor import ProcessContext, Processor
from flywheel_loop.engine.state import ProcessorState
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
    interaction_id TEXT PRIMARY KEY, event_id TEXT NOT NULL, body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS evidence (
    event_id TEXT PRIMARY KEY, interaction_id TEXT NOT NULL, kind TEXT NOT NULL, body BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS evidence_by_interaction ON evidence (interaction_id, event_id);
CREATE TABLE IF NOT EXISTS current (interaction_id TEXT PRIMARY KEY, fingerprint BLOB NOT NULL);
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
    """The evidence of every interaction, in the tables of the processor's state store."""

    def __init__(self, state: ProcessorState) -> None:
        self.state = state
        self.db = state.db

    def is_forgotten(self, interaction_id: str) -> bool:
        sql = "SELECT 1 FROM forgotten WHERE interaction_id = ?"
        return self.db.execute(sql, (interaction_id,)).fetchone() is not None

    def forget(self, interaction_ids: list[str], event_ids: list[str]) -> int:
        """Delete everything kept about these interactions (call inside a transaction); keep
        their ids so later evidence about them is dropped. Returns the interactions deleted."""
        ids = [(i,) for i in interaction_ids]
        # the outputs recorded for the evidence events (scores of the forgotten interactions)
        evidence_ids = [r[0] for i in interaction_ids for r in self.db.execute(
            "SELECT event_id FROM interactions WHERE interaction_id = ? UNION"
            " SELECT event_id FROM evidence WHERE interaction_id = ?", (i, i))]
        self.state.forget_outputs(sorted({*evidence_ids, *event_ids}))
        before = self.db.total_changes
        self.db.executemany("DELETE FROM interactions WHERE interaction_id = ?", ids)
        deleted = self.db.total_changes - before
        self.db.executemany("DELETE FROM evidence WHERE interaction_id = ?", ids)
        self.db.executemany("DELETE FROM current WHERE interaction_id = ?", ids)
        self.db.executemany("INSERT OR IGNORE INTO forgotten VALUES (?)", ids)
        return deleted

    def knows(self, interaction_id: str) -> bool:
        sql = "SELECT 1 FROM interactions WHERE interaction_id = ?"
        return self.db.execute(sql, (interaction_id,)).fetchone() is not None

    def add(self, event: Event[Any]) -> str:
        """Store one piece of evidence (idempotent by event id); return its interaction id."""
        data = event.data
        iid = interaction_id_of(data)
        body = data.model_dump_json().encode()
        if isinstance(data, InteractionAnonymized):
            self.db.execute(
                "INSERT INTO interactions VALUES (?, ?, ?) ON CONFLICT (interaction_id)"
                " DO UPDATE SET event_id = excluded.event_id, body = excluded.body",
                (iid, event.id, body),
            )
        else:
            kind = "feedback" if isinstance(data, FeedbackAnonymized) else "outcome"
            self.db.execute("INSERT OR IGNORE INTO evidence VALUES (?, ?, ?, ?)", (event.id, iid, kind, body))
        return iid

    def evidence(self, interaction_id: str) -> Evidence:
        event_id, body = self.db.execute(
            "SELECT event_id, body FROM interactions WHERE interaction_id = ?", (interaction_id,)
        ).fetchone()
        rows = self.db.execute(
            "SELECT event_id, kind, body FROM evidence WHERE interaction_id = ? ORDER BY event_id",
            (interaction_id,),
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

    def fingerprint(self, interaction_id: str) -> bytes | None:
        sql = "SELECT fingerprint FROM current WHERE interaction_id = ?"
        row = self.db.execute(sql, (interaction_id,)).fetchone()
        return row[0] if row else None

    def record(self, interaction_id: str, fingerprint: bytes | None) -> None:
        """Remember the interaction's current score (its fingerprint), if it produced one."""
        if fingerprint is not None:
            self.db.execute(
                "INSERT INTO current VALUES (?, ?) ON CONFLICT (interaction_id)"
                " DO UPDATE SET fingerprint = excluded.fingerprint",
                (interaction_id, fingerprint),
            )


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
    """The processor: the assessor panel, and the step over the evidence in ``ctx.state``."""

    def __init__(self) -> None:
        self.panel: AssessorPanel | None = None

    def handle(self, event: Event[Any], ctx: ProcessContext) -> list[QualityAssessed]:
        store = EvidenceStore(ctx.state)
        if isinstance(event.data, DataForgotten):
            n = store.forget(event.data.interaction_ids, event.data.event_ids)
            ctx.log.info("forgot the evidence of %d interactions (%s)", n, event.id)
            return []
        iid = interaction_id_of(event.data)
        if store.is_forgotten(iid):
            return []  # evidence about a forgotten interaction: dropped
        if not isinstance(event.data, InteractionAnonymized) and not store.knows(iid):
            raise UnknownInteraction(
                f"{event.type} {event.id} is about interaction {iid}, which scoring has not seen"
                " (no interaction.anonymized for it yet)"
            )
        if self.panel is None:
            if ctx.plugins is None:
                raise RuntimeError("scoring needs the plugin host (ProcessContext.plugins) to find its assessors")
            self.panel = AssessorPanel(ctx.plugins.assessors(), AssessmentConfig.of(ctx.settings))
        store.add(event)
        evidence = store.evidence(iid)
        results = self.panel.assess(evidence)
        for r in results:
            if r.fallback:
                ctx.log.warning("assessor %s fell back (%s) on %s: %s", r.name, r.fallback, iid, r.reason)
        combined = combine(results, AssessmentConfig.of(ctx.settings))
        if _failed_call(evidence):
            combined = None  # the upstream never answered: nothing to score, nothing to learn from
        payload = quality_assessed(evidence, combined) if combined else None
        fingerprint = payload.model_dump_json(exclude={"evidence"}).encode() if payload else None
        if fingerprint is not None and fingerprint == store.fingerprint(iid):
            return []  # the evidence changed nothing: no new event
        store.record(iid, fingerprint)
        return [payload] if payload else []


def processor(settings: Settings) -> Processor:
    """The scorer processor, configured by ``settings``."""
    return Processor(
        name="scoring",
        consumes=CONSUMES,
        handle=Scoring().handle,
        description="scores anonymized interactions with every assessor; re-scores on new evidence",
        stateful=True,
        tables=TABLES,
    )
