"""Evaluation: a candidate adapter is measured against the model in service, and gated.

- processor ``evaluator``: for each ``training.completed``, the candidate and the version in
  service (at that log position) on the same items: held-out loss, a task pass rate from
  running the held-out tasks' tests, forgetting, latency, memory and canary prompts; the gate's
  verdict (passed, failed or inconclusive) with one check per figure (its interval and item count)
  in ``evaluation.completed``; ``evaluation.progressed`` while it runs;
- command ``flywheel eval``: a coding suite's pass@1 with its interval for any version;
- settings ``[evaluator]``.
"""

from __future__ import annotations

from collections.abc import Callable

import typer

from flywheel_loop.engine.config import PluginSection, Settings
from flywheel_loop.engine.hookspecs import hookimpl
from flywheel_loop.engine.processor import Handler, Processor
from flywheel_loop.plugins.evaluation.settings import EvaluatorConfig
from flywheel_loop.plugins.shared.deferred import Deferred


@hookimpl
def register_settings(register: Callable[[type[PluginSection]], None]) -> None:
    register(EvaluatorConfig)


def _evaluator() -> Handler:
    from flywheel_loop.plugins.evaluation.evaluator import Evaluator

    return Evaluator().handle


def processor(settings: Settings) -> Processor:
    """The evaluator processor (``evaluator.Evaluator`` does the work)."""
    return Processor(
        name="evaluator",
        consumes=("training.completed",),
        handle=Deferred(_evaluator),  # its module imports torch: on the first input
        description="measures each trained adapter against the model in service and applies the gate",
        batch=1,
        produces=("evaluation.completed",),  # not the live evaluation.progressed: it decides nothing
        stateful=True,  # no tables: the fold knows which runs' evaluations are on the log (exactly once)
    )


@hookimpl
def register_processors(register: Callable[[Processor], None], settings: Settings) -> None:
    register(processor(settings))


@hookimpl
def register_commands(cli: typer.Typer) -> None:
    from flywheel_loop.plugins.evaluation import commands

    commands.register(cli)
