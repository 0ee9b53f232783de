"""How the assessors' answers become one score, within budgets and behind circuit breakers.

The pure parts of scoring, testable without NATS:

- ``combine`` turns the assessments into per-dimension scores, one reward and a confidence,
  with the weights from ``AssessmentConfig``;
- ``AssessorPanel`` calls every enabled assessor with its time budget and a circuit breaker,
  and records a fallback for an assessor that raised, overran its budget or is switched off
  by its breaker.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from flywheel_loop.engine.assessment import Assessment, Assessor, Evidence
from flywheel_loop.plugins.scoring.settings import AssessmentConfig

__all__ = ["AssessorPanel", "AssessorResult", "CircuitBreaker", "Combined", "combine"]

#: Scores are rounded so that a re-computation gives the same bytes (and the same event).
PRECISION = 6


FallbackKind = Literal["raised", "over_budget", "breaker_open", "invalid"]


@dataclass(frozen=True)
class AssessorResult:
    """What the panel got from one assessor: an assessment, nothing (None), or a fallback."""

    name: str
    assessment: Assessment | None
    elapsed_ms: float = 0.0
    fallback: FallbackKind | None = None
    reason: str = ""


@dataclass(frozen=True)
class Combined:
    """The overall result: per-dimension scores, the reward and how sure it is."""

    scores: dict[str, float]
    reward: float
    confidence: float
    assessors: dict[str, str]
    fallbacks: list[str] = field(default_factory=list)


def _assessor_score(
    assessment: Assessment, weights: Mapping[str, float] | None
) -> tuple[float | None, float]:
    """(weighted score over the dimensions present or None, confidence) of one assessment."""
    dims = assessment.scores
    if weights:
        present = {d: weights.get(d, 0.0) for d in dims}
        total = sum(weights.values())
    else:  # an assessor nobody configured: its dimensions count equally
        present = {d: 1.0 for d in dims}
        total = float(len(dims))
    mass = sum(present.values())
    score = sum(w * dims[d] for d, w in present.items()) / mass if mass > 0 else None
    confidence = assessment.confidence
    if confidence is None:
        confidence = mass / total if total > 0 else 0.0
    return score, confidence


def combine(results: list[AssessorResult], cfg: AssessmentConfig) -> Combined | None:
    """Weigh the assessors' results into one ``Combined``; None when nothing could be scored.

    - reward: the assessor-weighted mean of the assessors that produced a score;
    - confidence: the assessor-weighted mean of their confidences, where an assessor that
      fell back, or had no evidence yet, counts 0 (an assessor returning None is not
      counted at all: the interaction is not its business);
    - an assessor without a configured weight is recorded but moves neither.
    """
    scores: dict[str, float] = {}
    assessors: dict[str, str] = {}
    fallbacks: list[str] = []
    reward_num = reward_den = conf_num = conf_den = 0.0
    for result in sorted(results, key=lambda r: r.name):
        weight = cfg.assessor_weights.get(result.name, 0.0)
        if result.fallback is not None:
            fallbacks.append(result.name)
            conf_den += weight
            continue
        if result.assessment is None:
            continue
        a = result.assessment
        assessors[result.name] = a.version
        score, confidence = _assessor_score(a, cfg.dimension_weights.get(result.name))
        for dim, value in a.scores.items():
            scores[f"{result.name}.{dim}"] = round(float(value), PRECISION)
        conf_den += weight
        conf_num += weight * confidence
        if score is not None:
            scores[result.name] = round(score, PRECISION)
            reward_num += weight * score
            reward_den += weight
    if reward_den <= 0:
        return None
    return Combined(
        scores=dict(sorted(scores.items())),
        reward=round(reward_num / reward_den, PRECISION),
        confidence=round(conf_num / conf_den, PRECISION) if conf_den > 0 else 0.0,
        assessors=assessors,
        fallbacks=fallbacks,
    )


class CircuitBreaker:
    """Stops calling an assessor that keeps failing, and tries it again after a pause.

    Closed: every call goes through. ``failures`` consecutive failures (an exception or an
    overrun) open it: calls are skipped for ``reset_s``; then one trial call goes through
    (half-open), and its success closes the breaker while its failure opens it again.
    """

    def __init__(self, failures: int, reset_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.failures = failures
        self.reset_s = reset_s
        self.clock = clock
        self.consecutive = 0
        self.state: Literal["closed", "open", "half_open"] = "closed"
        self.opened_at = 0.0

    def allow(self) -> bool:
        if self.state == "open" and self.clock() - self.opened_at >= self.reset_s:
            self.state = "half_open"
            return True
        return self.state != "open"

    def succeeded(self) -> None:
        self.consecutive = 0
        self.state = "closed"

    def failed(self) -> None:
        self.consecutive += 1
        if self.state == "half_open" or self.consecutive >= self.failures:
            self.state = "open"
            self.opened_at = self.clock()


class _GcPauses:
    """Seconds spent in Python's cyclic garbage collector since start-up.

    A full collection can pause the process for ~10 ms (measured: ``ast.parse`` of a
    300-line answer has a 1.2 ms median and a 10 ms p99 with the collector on, 1.2 ms with
    it off), and it starts in whichever call happens to allocate; the budget should not
    charge an assessor for it.
    """

    def __init__(self) -> None:
        self.total = 0.0
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.total += time.perf_counter() - self._started

    def timer(self) -> float:
        """A perf_counter that stands still while the collector runs."""
        return time.perf_counter() - self.total


GC_PAUSES = _GcPauses()
gc.callbacks.append(GC_PAUSES)


class AssessorPanel:
    """Calls every enabled assessor, each within its budget and breaker.

    Assessors are called one by one so each can be timed, and so one that raises does not take
    the others down. Python cannot interrupt
    a running function, so the budget is enforced after the fact: an answer that took
    longer than the budget (garbage-collection pauses aside) is discarded and recorded as a
    fallback, and repeated overruns open the breaker, which then skips the assessor.
    """

    def __init__(
        self,
        assessors: Sequence[Assessor],
        cfg: AssessmentConfig,
        timer: Callable[[], float] = GC_PAUSES.timer,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.assessors = sorted(assessors, key=lambda a: a.name)
        self.cfg = cfg
        self.timer = timer
        self.clock = clock
        self.breakers: dict[str, CircuitBreaker] = {}

    def budget_ms(self, name: str) -> float:
        return self.cfg.budgets_ms.get(name, self.cfg.budget_ms)

    def _breaker(self, name: str) -> CircuitBreaker:
        if name not in self.breakers:
            cfg = self.cfg
            self.breakers[name] = CircuitBreaker(cfg.breaker_failures, cfg.breaker_reset_s, self.clock)
        return self.breakers[name]

    def assess(self, evidence: Evidence) -> list[AssessorResult]:
        """One result per enabled assessor, in name order."""
        return [self._call(a.name, a.assess, evidence) for a in self.assessors if a.name not in self.cfg.disabled]

    def _call(self, name: str, function: Callable[[Evidence], Any], evidence: Evidence) -> AssessorResult:
        breaker = self._breaker(name)
        if not breaker.allow():
            return AssessorResult(name, None, fallback="breaker_open", reason="circuit breaker open")
        start = self.timer()
        try:
            out = function(evidence)
        except Exception as exc:  # a plugin may raise anything; the others still run
            breaker.failed()
            elapsed = (self.timer() - start) * 1000
            return AssessorResult(name, None, elapsed, "raised", f"{type(exc).__name__}: {exc}")
        elapsed = (self.timer() - start) * 1000
        budget = self.budget_ms(name)
        if elapsed > budget:
            breaker.failed()
            return AssessorResult(
                name, None, elapsed, "over_budget", f"took {elapsed:.2f} ms; its budget is {budget:g} ms"
            )
        if out is not None and not isinstance(out, Assessment):
            breaker.failed()
            reason = f"returned {type(out).__name__}, not an Assessment"
            return AssessorResult(name, None, elapsed, "invalid", reason)
        breaker.succeeded()
        return AssessorResult(name, out, elapsed)
