"""The demo's figures, read back from the log: nothing here trusts what the agent remembers.

A phase's figures are computed from the events the engine put on the log for the phase's
interactions: the latest ``outcome.anonymized`` of each (the tests ran: passed means it compiled,
at least one test passed and none failed) and its latest ``quality.assessed`` (the ``convention``
assessor's ``convention.header`` score). Forgetting and the gate's verdict are the
``evaluation.completed`` event's own figures. Each figure carries the ids of the events it came
from, so a reader (and ``tests/test_demo.py``) can recompute it from the log.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flywheel_loop.engine.bus import Bus
from flywheel_loop.schemas import InvalidEvent, OutcomeAnonymized, QualityAssessed, parse_event, subject_for

__all__ = ["PhaseFigures", "phase_figures", "read_since", "scored"]

CONVENTION_SCORE = "convention.header"


async def read_since(bus: Bus, after_seq: int, types: tuple[str, ...]) -> list[tuple[int, Any]]:
    """(sequence, event) of every event of ``types`` on the log after ``after_seq``, in order."""
    out: list[tuple[int, Any]] = []
    async for seq, data in bus.scan("log", [subject_for(t) for t in types], after_seq=after_seq):
        try:
            out.append((seq, parse_event(data)))
        except InvalidEvent:
            continue
    return out


@dataclass
class PhaseFigures:
    """One phase's figures over its interactions, with the events they came from."""

    phase: str
    model_ids: list[str]
    tasks: int
    passed: int
    following: int
    outcome_ids: list[str] = field(default_factory=list)
    score_ids: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    @property
    def pass_rate(self) -> float:
        return self.passed / self.tasks if self.tasks else 0.0

    @property
    def convention_rate(self) -> float:
        return self.following / self.tasks if self.tasks else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "model_ids": self.model_ids,
            "tasks": self.tasks,
            "passed": self.passed,
            "following": self.following,
            "pass_rate": self.pass_rate,
            "convention_rate": self.convention_rate,
            "outcome_ids": self.outcome_ids,
            "score_ids": self.score_ids,
            "missing": self.missing,
        }


def _latest(events: list[tuple[int, Any]], interaction_ids: set[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    outcomes: dict[str, Any] = {}
    scores: dict[str, Any] = {}
    for _, event in events:  # in log order: later events win
        data = event.data
        if isinstance(data, OutcomeAnonymized) and data.outcome.interaction_id in interaction_ids:
            outcomes[data.outcome.interaction_id] = event
        elif isinstance(data, QualityAssessed) and data.interaction_id in interaction_ids:
            scores[data.interaction_id] = event
    return outcomes, scores


def scored(events: list[tuple[int, Any]], interaction_ids: list[str], dimensions: tuple[str, ...]) -> bool:
    """Whether every interaction has a score with all of ``dimensions`` (the evidence it waits for)."""
    _, scores = _latest(events, set(interaction_ids))
    for iid in interaction_ids:
        event = scores.get(iid)
        if event is None or any(d not in event.data.scores for d in dimensions):
            return False
    return True


async def phase_figures(bus: Bus, phase: str, interaction_ids: list[str]) -> PhaseFigures:
    """The figures of ``phase`` (the interactions ``interaction_ids``) as the log has them now."""
    events = await read_since(bus, 0, ("outcome.anonymized", "quality.assessed"))
    outcomes, scores = _latest(events, set(interaction_ids))
    figures = PhaseFigures(phase=phase, model_ids=[], tasks=len(interaction_ids), passed=0, following=0)
    for iid in interaction_ids:
        outcome, score = outcomes.get(iid), scores.get(iid)
        if outcome is None or score is None:
            figures.missing.append(iid)
            continue
        o = outcome.data.outcome
        if o.compiles and (o.tests_passed or 0) > 0 and not o.tests_failed:
            figures.passed += 1
        if score.data.scores.get(CONVENTION_SCORE) == 1.0:
            figures.following += 1
        if score.data.model_id and score.data.model_id not in figures.model_ids:
            figures.model_ids.append(score.data.model_id)
        figures.outcome_ids.append(outcome.id)
        figures.score_ids.append(score.id)
    return figures
