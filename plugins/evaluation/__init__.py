"""Evaluation: a candidate adapter is measured against the model in service, and gated.

- processor ``evaluator``: for each ``training.completed``, the candidate and the version in
  service (at that log position) on the same items: held-out loss, a task pass rate from
  running the held-out tasks' tests, forgetting, latency, memory and canary prompts; the gate's
  verdict with one reason per check in ``evaluation.completed``;
- settings ``[evaluator]``.
"""

from __future__ import annotations

from collections.abc import Callable

from flywheel_loop.engine.config import PluginSection, Settings
from flywheel_loop.engine.hookspecs import hookimpl
from flywheel_loop.engine.processor import Processor
from flywheel_loop.plugins.evaluation.settings import EvaluatorConfig


@hookimpl
def register_settings(register: Callable[[type[PluginSection]], None]) -> None:
    register(EvaluatorConfig)


@hookimpl
def register_processors(register: Callable[[Processor], None], settings: Settings) -> None:
    from flywheel_loop.plugins.evaluation import evaluator

    register(evaluator.processor(settings))
