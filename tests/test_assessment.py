"""Assessment without NATS: weights, confidence, the budget, the breaker, the built-in assessors."""

from __future__ import annotations

import ast
import gc
from pathlib import Path
from typing import Any

import pytest

from flywheel_loop.engine.assessment import Assessment, Assessor, Evidence
from flywheel_loop.engine.config import ConfigError, load_settings
from flywheel_loop.engine.plugin_host import PluginHost
from flywheel_loop.plugins.scoring import outcome_reward, quality_dimensions, ruff_lint
from flywheel_loop.plugins.scoring.panel import GC_PAUSES, AssessorPanel, AssessorResult, CircuitBreaker, combine
from flywheel_loop.plugins.scoring.settings import AssessmentConfig
from flywheel_loop.schemas import FeedbackGiven, InteractionAnonymized, OutcomeObserved, parse_event

EXAMPLES = Path(__file__).parent.parent / "schemas" / "examples"


def example(event_type: str) -> Any:
    return parse_event((EXAMPLES / f"{event_type}.json").read_bytes())


INTERACTION = example("interaction.anonymized").data
FEEDBACK = example("feedback.anonymized").data.feedback
OUTCOME = example("outcome.anonymized").data.outcome
IID = INTERACTION.interaction_id


def evidence(
    feedback: tuple[FeedbackGiven, ...] = (), outcomes: tuple[OutcomeObserved, ...] = (),
    interaction: InteractionAnonymized = INTERACTION,
) -> Evidence:
    return Evidence(IID, interaction, feedback, outcomes)


def with_output(output: str, language: str | None = "python") -> InteractionAnonymized:
    recorded = INTERACTION.interaction.model_copy(
        update={
            "output": output,
            "context": INTERACTION.interaction.context.model_copy(update={"language": language}),
        }
    )
    return INTERACTION.model_copy(update={"interaction": recorded})


class Clock:
    """A hand-driven clock: assessors advance it to "take" time, so no test waits."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def panel(
    *assessors: tuple[str, Any], cfg: AssessmentConfig | None = None, clock: Clock | None = None
) -> AssessorPanel:
    clock = clock or Clock()
    registered = [Assessor(name, a.assess) for name, a in assessors]
    return AssessorPanel(registered, cfg or AssessmentConfig(), timer=clock, clock=clock)


BUILTINS = (("outcome_reward", outcome_reward), ("quality_dimensions", quality_dimensions))


class Fixed:
    """An assessor that always says the same thing."""

    def __init__(
        self,
        scores: dict[str, float],
        confidence: float | None = None,
        cost_s: float = 0.0,
        clock: Clock | None = None,
    ) -> None:
        self.scores, self.confidence, self.cost_s, self.clock, self.calls = (
            scores,
            confidence,
            cost_s,
            clock,
            0,
        )

    def assess(self, evidence: Evidence) -> Assessment:
        self.calls += 1
        if self.clock is not None:
            self.clock.now += self.cost_s
        return Assessment(self.scores, "9.9", self.confidence)


class Raising:
    def __init__(self) -> None:
        self.calls = 0

    def assess(self, evidence: Evidence) -> Assessment:
        self.calls += 1
        raise RuntimeError("model file missing")


# --------------------------------------------------------------------------- weights


def test_reward_is_the_configured_weighting_of_dimensions_and_assessors() -> None:
    cfg = AssessmentConfig(
        assessor_weights={"a": 3.0, "b": 1.0},
        dimension_weights={"a": {"x": 0.75, "y": 0.25}, "b": {"z": 1.0}},
    )
    results = [
        AssessorResult("a", Assessment({"x": 1.0, "y": 0.0}, "1")),
        AssessorResult("b", Assessment({"z": 0.5}, "2")),
    ]
    combined = combine(results, cfg)
    assert combined is not None
    assert combined.scores == {"a": 0.75, "a.x": 1.0, "a.y": 0.0, "b": 0.5, "b.z": 0.5}
    assert combined.reward == pytest.approx((3 * 0.75 + 1 * 0.5) / 4)
    assert combined.confidence == 1.0
    assert combined.assessors == {"a": "1", "b": "2"}


def test_default_weights_are_the_reference_design() -> None:
    cfg = AssessmentConfig.of(load_settings())
    assert cfg.dimension_weights["outcome_reward"] == {
        "compile": 0.25,
        "tests": 0.25,
        "errors": 0.25,
        "human": 0.25,
    }
    assert cfg.dimension_weights["quality_dimensions"] == {
        "satisfaction": 0.30,
        "correctness": 0.25,
        "code_quality": 0.20,
        "relevance": 0.15,
        "efficiency": 0.10,
    }
    # the outcome reward of the worked example: compiles, 4/5 tests, no errors, modified (0.5)
    result = panel(*BUILTINS).assess(evidence((FEEDBACK,), (OUTCOME,)))
    combined = combine(result, cfg)
    assert combined is not None
    assert combined.scores["outcome_reward"] == pytest.approx(0.25 * (1.0 + 0.8 + 1.0 + 0.5))


def test_configured_weights_override_one_assessor_and_keep_the_other_defaults() -> None:
    settings = load_settings(assessment={"dimension_weights": {"outcome_reward": {"tests": 1.0}}})
    weights = AssessmentConfig.of(settings).dimension_weights
    assert weights["outcome_reward"] == {"tests": 1.0}
    assert weights["quality_dimensions"]["satisfaction"] == 0.30
    combined = combine(panel(*BUILTINS).assess(evidence((FEEDBACK,), (OUTCOME,))), AssessmentConfig.of(settings))
    assert combined is not None and combined.scores["outcome_reward"] == pytest.approx(0.8)


def test_weights_that_cannot_weigh_are_a_config_error_naming_the_key() -> None:
    # plugin sections are validated when the plugins load (as every command and `flywheel up` do)
    with pytest.raises(ConfigError, match="assessment.dimension_weights"):
        PluginHost(load_settings(assessment={"dimension_weights": {"outcome_reward": {"tests": 0.0}}}))
    with pytest.raises(ConfigError, match="assessment.assessor_weights"):
        PluginHost(load_settings(assessment={"assessor_weights": {"outcome_reward": -1.0}}))


def test_an_assessor_without_a_weight_is_recorded_but_moves_nothing() -> None:
    cfg = AssessmentConfig(assessor_weights={"a": 1.0}, dimension_weights={"a": {"x": 1.0}})
    results = [
        AssessorResult("a", Assessment({"x": 0.6}, "1")),
        AssessorResult("extra", Assessment({"q": 0.0}, "1")),
    ]
    combined = combine(results, cfg)
    assert combined is not None
    assert combined.reward == 0.6 and combined.confidence == 1.0
    assert combined.scores["extra.q"] == 0.0 and combined.assessors["extra"] == "1"


def test_missing_dimensions_renormalise_the_reward_and_lower_the_confidence() -> None:
    cfg = AssessmentConfig(assessor_weights={"a": 1.0}, dimension_weights={"a": {"x": 0.25, "y": 0.75}})
    combined = combine([AssessorResult("a", Assessment({"x": 0.4}, "1"))], cfg)
    assert combined is not None
    assert combined.reward == 0.4  # the present dimension alone, not 0.4 x 0.25
    assert combined.confidence == 0.25  # a quarter of the weight had evidence


def test_nothing_scored_gives_no_assessment() -> None:
    cfg = AssessmentConfig()
    assert combine([AssessorResult("outcome_reward", Assessment({}, "1"))], cfg) is None
    assert combine([AssessorResult("quality_dimensions", None)], cfg) is None


@pytest.mark.parametrize(
    ("scores", "confidence"), [({"x": 1.5}, None), ({"x": float("nan")}, None), ({}, 2.0)]
)
def test_an_assessment_out_of_range_is_refused(scores: dict[str, float], confidence: float | None) -> None:
    with pytest.raises(ValueError):
        Assessment(scores, "1", confidence)


# --------------------------------------------------------------------------- confidence


def test_confidence_rises_with_each_kind_of_evidence() -> None:
    cfg = AssessmentConfig()
    p = panel(*BUILTINS)
    steps = [evidence(), evidence(outcomes=(OUTCOME,)), evidence((FEEDBACK,), (OUTCOME,))]
    confidences = []
    for ev in steps:
        combined = combine(p.assess(ev), cfg)
        assert combined is not None
        confidences.append(combined.confidence)
    # interaction only: quality's static half (0.45 of 1) and no outcome evidence at all
    assert confidences[0] == pytest.approx(0.5 * 0.45)
    assert confidences[0] < confidences[1] < confidences[2] == 1.0


def test_an_assessors_own_confidence_is_used_when_it_gives_one() -> None:
    cfg = AssessmentConfig(assessor_weights={"sure": 1.0})
    combined = combine([AssessorResult("sure", Assessment({"x": 1.0}, "1", confidence=0.3))], cfg)
    assert combined is not None and combined.confidence == 0.3


def test_evidence_folds_fields_in_event_order() -> None:
    first = FeedbackGiven(interaction_id=IID, rating=2)
    later = FeedbackGiven(interaction_id=IID, implicit="accepted", time_to_accept_s=3.0)
    merged = evidence((first, later)).latest_feedback()
    assert merged is not None
    assert (merged.rating, merged.implicit, merged.time_to_accept_s) == (2, "accepted", 3.0)
    rerun = OutcomeObserved(interaction_id=IID, tests_passed=5, tests_failed=0)
    outcome = evidence(outcomes=(OUTCOME, rerun)).latest_outcome()
    assert outcome is not None
    assert (outcome.compiles, outcome.tests_passed, outcome.tests_failed) == (True, 5, 0)


# --------------------------------------------------------------------------- budget, breaker, fallback


def test_an_assessor_over_its_budget_falls_back_and_the_others_still_count() -> None:
    clock = Clock()
    slow = Fixed({"x": 1.0}, cost_s=0.012, clock=clock)  # 12 ms against a 5 ms budget
    cfg = AssessmentConfig(assessor_weights={"slow": 1.0, "quick": 1.0})
    results = panel(("slow", slow), ("quick", Fixed({"y": 0.2})), cfg=cfg, clock=clock).assess(evidence())
    by_name = {r.name: r for r in results}
    assert by_name["slow"].fallback == "over_budget" and by_name["slow"].assessment is None
    assert "12.00 ms" in by_name["slow"].reason and "5 ms" in by_name["slow"].reason
    combined = combine(results, cfg)
    assert combined is not None
    assert combined.fallbacks == ["slow"]
    assert combined.reward == 0.2 and combined.confidence == 0.5
    assert "slow.x" not in combined.scores


def test_a_garbage_collection_pause_is_not_charged_to_the_assessor() -> None:
    live = [[i] for i in range(500_000)]  # something for a full collection to walk

    class Collecting:
        def assess(self, evidence: Evidence) -> Assessment:
            gc.collect()  # stands for a collection that happens to start during the call
            return Assessment({"x": 1.0}, "1")

    before = GC_PAUSES.total
    (result,) = AssessorPanel([Assessor("collecting", Collecting().assess)], AssessmentConfig(budget_ms=5.0)).assess(
        evidence()
    )
    assert GC_PAUSES.total > before and len(live) == 500_000
    assert result.fallback is None and result.elapsed_ms < 5.0


def test_a_slow_assessor_may_have_its_own_budget() -> None:
    clock = Clock()
    cfg = AssessmentConfig(budgets_ms={"ruffish": 50.0})
    result = panel(("ruffish", Fixed({"x": 1.0}, cost_s=0.012, clock=clock)), cfg=cfg, clock=clock).assess(
        evidence()
    )
    assert result[0].fallback is None and result[0].assessment is not None


def test_an_assessor_that_raises_or_returns_garbage_falls_back() -> None:
    class Garbage:
        def assess(self, evidence: Evidence) -> Any:
            return {"x": 1.0}

    results = panel(("boom", Raising()), ("garbage", Garbage()), *BUILTINS).assess(evidence())
    by_name = {r.name: r for r in results}
    assert by_name["boom"].fallback == "raised" and "model file missing" in by_name["boom"].reason
    assert by_name["garbage"].fallback == "invalid"
    assert by_name["quality_dimensions"].assessment is not None


def test_the_breaker_opens_after_repeated_failures_then_tries_again() -> None:
    clock = Clock()
    boom = Raising()
    cfg = AssessmentConfig(breaker_failures=3, breaker_reset_s=30.0)
    p = panel(("boom", boom), cfg=cfg, clock=clock)
    kinds = [p.assess(evidence())[0].fallback for _ in range(5)]
    assert kinds == ["raised", "raised", "raised", "breaker_open", "breaker_open"]
    assert boom.calls == 3  # an open breaker does not call the assessor
    clock.now += 30.0
    assert p.assess(evidence())[0].fallback == "raised"  # the half-open trial call
    assert boom.calls == 4
    assert p.assess(evidence())[0].fallback == "breaker_open"  # the trial failed: open again


def test_a_successful_trial_closes_the_breaker() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failures=2, reset_s=10.0, clock=clock)
    breaker.failed()
    breaker.failed()
    assert not breaker.allow()
    clock.now = 10.0
    assert breaker.allow() and breaker.state == "half_open"
    breaker.succeeded()
    assert breaker.state == "closed" and breaker.allow()
    breaker.failed()
    assert breaker.allow()  # one failure after closing is not enough to open it again


def test_a_disabled_assessor_is_not_called() -> None:
    quiet = Fixed({"x": 1.0})
    results = panel(("quiet", quiet), cfg=AssessmentConfig(disabled=["quiet"])).assess(evidence())
    assert results == [] and quiet.calls == 0


# --------------------------------------------------------------------------- the built-in assessors


def test_outcome_reward_scores_each_piece_of_evidence() -> None:
    assert outcome_reward.assess(evidence()).scores == {}
    outcome = OutcomeObserved(
        interaction_id=IID, compiles=False, tests_passed=1, tests_failed=3, lint_errors=2, runtime_errors=1
    )
    scores = outcome_reward.assess(
        evidence((FeedbackGiven(interaction_id=IID, thumbs="down"),), (outcome,))
    ).scores
    assert scores == {"compile": 0.0, "tests": 0.25, "errors": 0.25, "human": 0.0}
    rated = outcome_reward.assess(
        evidence((FeedbackGiven(interaction_id=IID, rating=4),))
    ).scores
    assert rated == {"human": 0.75}


def test_code_quality_measures_parsing_lint_and_complexity() -> None:
    clean = "def add(a: int, b: int) -> int:\n    return a + b\n"
    assert quality_dimensions.code_quality(clean) == 1.0
    assert quality_dimensions.code_quality("def broken(:\n    pass\n") == 0.0
    linty = "import os\n\n\ndef f(x=[]):\n    try:\n        return x == None\n    except:\n        pass\n"
    assert sorted(quality_dimensions.analyse(ast.parse(linty)).findings) == ["B006", "E711", "E722", "F401"]
    branches = (
        "def g(x):\n"
        + "".join(f"    if x == {i}:\n        return {i}\n" for i in range(19))
        + "    return -1\n"
    )
    assert max(quality_dimensions.analyse(ast.parse(branches)).complexity) == 20
    assert quality_dimensions.code_quality(branches) == pytest.approx(0.5)  # lint clean, complexity 0


def test_the_static_checks_cover_more_rules_and_measure_nested_functions_apart() -> None:
    source = "from os.path import *\nl = 1\nf = lambda: 0\nok = l == True\n"
    assert sorted(quality_dimensions.analyse(ast.parse(source)).findings) == ["E712", "E731", "E741", "F403"]
    nested = (
        "def outer(x):\n    if x:\n        return 1\n"
        "    def inner(y):\n        if y and x:\n            return 2\n        return 3\n"
        "    return inner\n"
    )
    assert sorted(quality_dimensions.analyse(ast.parse(nested)).complexity) == [
        1,
        2,
        3,
    ]  # module, outer, inner


def test_code_quality_is_left_out_when_the_answer_has_no_python() -> None:
    prose = with_output("Use a regular expression and strip the hyphens.", language=None)
    assert "code_quality" not in quality_dimensions.assess(evidence(interaction=prose)).scores
    fenced_js = with_output("```js\nconst a = 1;\n```", language="python")
    assert "code_quality" not in quality_dimensions.assess(evidence(interaction=fenced_js)).scores
    bare = with_output("def f():\n    return 1\n")
    assert quality_dimensions.assess(evidence(interaction=bare)).scores["code_quality"] == 1.0


def test_relevance_is_the_share_of_named_terms_the_answer_uses() -> None:
    recorded = INTERACTION.interaction.model_copy(
        update={
            "input": "Add retries to `fetch_user` and `save_user` in api/client.py",
            "output": "def fetch_user(): ...",
        }
    )
    assert quality_dimensions.relevance(recorded) == 0.5
    assert quality_dimensions.relevance(recorded.model_copy(update={"output": " "})) == 0.0


def test_satisfaction_reads_explicit_and_implicit_signals() -> None:
    happy = FeedbackGiven(
        interaction_id=IID, rating=5, thumbs="up", implicit="accepted", time_to_accept_s=0.0
    )
    assert quality_dimensions.satisfaction(happy) == 1.0
    gave_up = FeedbackGiven(interaction_id=IID, implicit="abandoned")
    assert quality_dimensions.satisfaction(gave_up) == 0.0
    assert quality_dimensions.satisfaction(FeedbackGiven(interaction_id=IID)) is None


def test_ruff_lint_counts_ruffs_findings_per_line() -> None:
    if ruff_lint.ruff_binary() is None:
        pytest.skip("ruff is not installed")
    linty = with_output("```python\nimport os\nimport sys\n\nx = 1\n```")
    assessment = ruff_lint.assess(evidence(interaction=linty))
    assert assessment is not None
    assert assessment.scores["lint"] == pytest.approx(1 / (1 + 5 * 2 / 3))  # 2 unused imports, 3 lines
    assert ruff_lint.assess(evidence(interaction=with_output("no code here", language=None))) is None
