"""Sampling: learning from verified attempts (rejection-sampling fine-tuning, execution-checked pairs).

- processor ``sampler``: for each ``sampling.requested``, k answers per recorded task with tests
  (not held out, not forgotten) from the model in service, each run against the task's tests in
  the sandbox; ``attempts.sampled`` per task (the answers sealed on the log) and
  ``sampling.completed`` with the round's pass@k. The dataset builder then builds the role's
  dataset with the passing answers (rows) and passing-vs-failing pairs (DPO);
- processor ``sampling_trigger``: a round per role after ``sampling.trigger_new_tasks`` new tasks
  with tests (off by default);
- command ``flywheel rounds``: each round's figures (``flywheel train --role R --method rft`` starts one);
- projection ``rounds`` and the dashboard page ``/pages/rounds`` (the same figures);
- settings ``[sampling]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import typer

from flywheel_loop.engine.config import PluginSection, Settings
from flywheel_loop.engine.extensions import DashboardPage
from flywheel_loop.engine.hookspecs import hookimpl
from flywheel_loop.engine.processor import Processor
from flywheel_loop.engine.projection import Projection
from flywheel_loop.plugins.sampling.settings import SamplingConfig


@hookimpl
def register_settings(register: Callable[[type[PluginSection]], None]) -> None:
    register(SamplingConfig)


@hookimpl
def register_processors(register: Callable[[Processor], None], settings: Settings) -> None:
    from flywheel_loop.plugins.sampling import sampler, trigger

    register(sampler.processor(settings))
    register(trigger.processor(settings))


@hookimpl
def register_commands(cli: typer.Typer) -> None:
    from flywheel_loop.plugins.sampling import commands

    commands.register(cli)


@hookimpl
def register_projections(register: Callable[[Projection], None], settings: Settings) -> None:
    from flywheel_loop.plugins.sampling.view import RoundEvents

    register(RoundEvents())


def _round_rows(settings: Settings) -> tuple[Any, Any]:
    from flywheel_loop.plugins.sampling.view import round_rows

    return round_rows(settings)


@hookimpl
def register_dashboard_pages(register: Callable[[DashboardPage], None]) -> None:
    register(DashboardPage("rounds", "Rounds", _round_rows,
                           "learning from verified attempts: sample, build, train, gate, deploy"))
