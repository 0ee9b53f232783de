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

from collections.abc import Awaitable, Callable
from typing import Any

import typer

from flywheel_loop.engine.config import PluginSection, Settings
from flywheel_loop.engine.hookspecs import hookimpl
from flywheel_loop.engine.processor import Outputs, ProcessContext, Processor
from flywheel_loop.plugins.evaluation.settings import EvaluatorConfig


@hookimpl
def register_settings(register: Callable[[type[PluginSection]], None]) -> None:
    register(EvaluatorConfig)


class _Evaluator:
    """The evaluator's handler, imported on its first input. Its module brings in torch and
    transformers (a second or more), and every ``flywheel up`` registers this processor, also one
    started with ``--only`` for other steps, which never runs it."""

    def __init__(self) -> None:
        self._handle: Callable[[Any, ProcessContext], Awaitable[list[Any]]] | None = None

    async def __call__(self, event: Any, ctx: ProcessContext) -> Outputs:
        if self._handle is None:
            from flywheel_loop.plugins.evaluation.evaluator import Evaluator

            self._handle = Evaluator().handle
        return await self._handle(event, ctx)


def processor(settings: Settings) -> Processor:
    """The evaluator processor (``evaluator.Evaluator`` does the work)."""
    return Processor(
        name="evaluator",
        consumes=("training.completed",),
        handle=_Evaluator(),
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
