"""The scoring feature's settings: ``[assessment]`` (how assessors combine and how long each may take)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, field_validator

from flywheel_loop.engine.config import PluginSection

#: The reference design's weights; a configured set for an assessor replaces its defaults.
DEFAULT_DIMENSION_WEIGHTS: dict[str, dict[str, float]] = {
    "outcome_reward": {"compile": 0.25, "tests": 0.25, "errors": 0.25, "human": 0.25},
    "quality_dimensions": {
        "satisfaction": 0.30,
        "correctness": 0.25,
        "code_quality": 0.20,
        "relevance": 0.15,
        "efficiency": 0.10,
    },
}
DEFAULT_ASSESSOR_WEIGHTS: dict[str, float] = {"outcome_reward": 0.5, "quality_dimensions": 0.5}


class AssessmentConfig(PluginSection):
    """How assessors' scores combine into one reward, and how long each may take.

    Assessors are named by their plugin name. An assessor missing from ``assessor_weights``
    is recorded in ``quality.assessed`` but does not move the reward (installing a plugin
    never silently changes rewards). Configured weight sets are merged over the defaults,
    assessor by assessor; set a weight to 0 to drop a dimension.
    """

    section_name: ClassVar[str] = "assessment"

    assessor_weights: dict[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_ASSESSOR_WEIGHTS),
        description="assessor -> its share of the overall reward",
    )
    dimension_weights: dict[str, dict[str, float]] = Field(
        default_factory=lambda: {k: dict(v) for k, v in DEFAULT_DIMENSION_WEIGHTS.items()},
        description="assessor -> dimension -> weight within that assessor's score",
    )
    budget_ms: float = Field(default=5.0, gt=0, description="time one assessor may take per interaction")
    budgets_ms: dict[str, float] = Field(
        default_factory=lambda: {"ruff_lint": 500.0},
        description="per-assessor budgets that replace budget_ms (slow, opt-in assessors)",
    )
    disabled: list[str] = Field(
        default_factory=lambda: ["ruff_lint"],
        description="installed assessors not run (ruff_lint runs a subprocess: over 5 ms)",
    )
    breaker_failures: int = Field(
        default=3, ge=1, description="consecutive failures or overruns that open an assessor's breaker"
    )
    breaker_reset_s: float = Field(
        default=30.0, gt=0, description="how long an open breaker skips its assessor before one trial call"
    )

    @field_validator("assessor_weights", "budgets_ms")
    @classmethod
    def _non_negative(cls, value: dict[str, float]) -> dict[str, float]:
        bad = {k: v for k, v in value.items() if v < 0}
        if bad:
            raise ValueError(f"weights and budgets must be >= 0, got {bad}")
        return value

    @field_validator("assessor_weights")
    @classmethod
    def _merge_assessors(cls, value: dict[str, float]) -> dict[str, float]:
        return {**DEFAULT_ASSESSOR_WEIGHTS, **value}

    @field_validator("dimension_weights")
    @classmethod
    def _merge_dimensions(cls, value: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        merged = {k: dict(v) for k, v in DEFAULT_DIMENSION_WEIGHTS.items()}
        for assessor, weights in value.items():
            if any(w < 0 for w in weights.values()) or not sum(weights.values()) > 0:
                raise ValueError(f"{assessor}: weights must be >= 0 and not all 0, got {weights}")
            merged[assessor] = dict(weights)
        return merged
