"""Built-in assessor: the outcome reward of the reference design.

Four dimensions, each from the evidence that arrived (weights in
``assessment.dimension_weights.outcome_reward``, 0.25 each by default):

- ``compile``: the answer compiled (1) or not (0);
- ``tests``: the pass rate, passed / (passed + failed);
- ``errors``: lint, type and runtime errors together, 1 / (1 + count), so the first error
  costs most;
- ``human``: accept (1), modify (0.5), reject or abandon (0); failing an implicit signal,
  thumbs up/down, failing that the 1-5 rating scaled to [0, 1].

With neither an outcome nor feedback it returns an empty assessment: it is relevant to
every interaction, and its missing evidence must lower the confidence.
"""

from __future__ import annotations

from flywheel_loop.engine.assessment import Assessment, Assessor, Evidence
from flywheel_loop.schemas import FeedbackGiven

VERSION = "1.0.0"

#: How much of an acceptance each implicit signal is.
IMPLICIT_ACCEPTANCE = {"accepted": 1.0, "modified": 0.5, "rejected": 0.0, "abandoned": 0.0}


def human_acceptance(feedback: FeedbackGiven) -> float | None:
    """The human's accept/reject in [0, 1], from the strongest signal given."""
    if feedback.implicit is not None:
        return IMPLICIT_ACCEPTANCE[feedback.implicit]
    if feedback.thumbs is not None:
        return 1.0 if feedback.thumbs == "up" else 0.0
    if feedback.rating is not None:
        return (feedback.rating - 1) / 4
    return None


def assess(evidence: Evidence) -> Assessment | None:
    scores: dict[str, float] = {}
    outcome = evidence.latest_outcome()
    if outcome is not None:
        if outcome.compiles is not None:
            scores["compile"] = 1.0 if outcome.compiles else 0.0
        ran = (outcome.tests_passed or 0) + (outcome.tests_failed or 0)
        if ran > 0:
            scores["tests"] = (outcome.tests_passed or 0) / ran
        counts = [outcome.lint_errors, outcome.type_errors, outcome.runtime_errors]
        if any(c is not None for c in counts):
            scores["errors"] = 1.0 / (1 + sum(c or 0 for c in counts))
    feedback = evidence.latest_feedback()
    if feedback is not None:
        human = human_acceptance(feedback)
        if human is not None:
            scores["human"] = human
    return Assessment(scores=scores, version=VERSION)


ASSESSOR = Assessor("outcome_reward", assess, VERSION)
