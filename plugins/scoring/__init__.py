"""Scoring: every anonymized interaction gets a reward from its evidence.

- processor ``scoring``: keeps each interaction's evidence (the interaction, its feedback and
  outcomes, late and in any order), asks every registered assessor, combines their answers
  with the configured weights and emits ``quality.assessed`` whenever the result changes;
- assessors ``outcome_reward`` (compiles, tests, errors, the human's verdict),
  ``quality_dimensions`` (satisfaction, correctness, code quality, relevance, efficiency),
  ``convention`` (the SPDX license header) and ``ruff_lint`` (opt-in: runs ruff);
- settings ``[assessment]``.
"""

from __future__ import annotations

from collections.abc import Callable

from flywheel_loop.engine.assessment import Assessor
from flywheel_loop.engine.config import PluginSection, Settings
from flywheel_loop.engine.hookspecs import hookimpl
from flywheel_loop.engine.processor import Processor
from flywheel_loop.plugins.scoring.settings import AssessmentConfig


@hookimpl
def register_settings(register: Callable[[type[PluginSection]], None]) -> None:
    register(AssessmentConfig)


@hookimpl
def register_processors(register: Callable[[Processor], None], settings: Settings) -> None:
    from flywheel_loop.plugins.scoring import scorer

    register(scorer.processor(settings))


@hookimpl
def register_assessors(register: Callable[[Assessor], None], settings: Settings) -> None:
    from flywheel_loop.plugins.scoring import convention, outcome_reward, quality_dimensions, ruff_lint

    for module in (outcome_reward, quality_dimensions, convention, ruff_lint):
        register(module.ASSESSOR)
