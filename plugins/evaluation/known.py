"""Which coding-suite problems a model is known to solve: what the focused suite sample draws on.

Two sources, merged:

- **the log**: every ``evaluation.completed`` carries its ``suite_results`` (the problems run, which the
  candidate solved, which the model in service solved); a model's known problems are those it solved
  in any of them, as the model in service or as the candidate (by adapter hash);
- **a calibration shipped with the suite** for the default base model (``data/<suite>.solved.json``,
  written by ``ops/bench/suite_calibrate.py --write-solved``): before the first evaluation the log knows
  nothing, and the default base model is what every new installation starts from.

Knowing is only a hint for drawing the sample: the gate runs both models on every drawn problem and
counts forgetting on the problems the model in service solves in that run, so a calibration measured on
another machine (another precision, another CPU) costs at most a few items, never a wrong figure.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flywheel_loop.plugins.evaluation.suite import DATA
from flywheel_loop.schemas import EvaluationCompleted, Event

__all__ = ["calibration_path", "known_solved", "logged_solved", "shipped_solved"]


def calibration_path(suite: str) -> Path:
    """Where the calibration of a shipped suite lives (the suite named by a path has none)."""
    return DATA / f"{suite}.solved.json"


def shipped_solved(suite: str, model: str) -> set[str]:
    """The problems of ``suite`` the shipped calibration says ``model`` (a base model's name) solved;
    empty when there is no calibration for that suite and model, or it cannot be read."""
    path = calibration_path(suite)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return set()
    if not isinstance(data, dict) or data.get("model") != model or data.get("suite") != suite:
        return set()
    return {str(x) for x in data.get("solved", [])}


def logged_solved(events: Iterable[tuple[int, Event[Any]]], suite: str, model: str) -> set[str]:
    """The problems of ``suite`` that ``model`` (an adapter hash, or the base model's name) solved in the
    evaluations on the log: as the model in service, or as the candidate."""
    solved: set[str] = set()
    for _, event in events:
        data = event.data
        if not isinstance(data, EvaluationCompleted) or data.suite_results is None:
            continue
        results = data.suite_results
        if results.suite != suite:
            continue
        if results.service == model:
            solved.update(results.service_solved)
        if data.adapter_hash == model:
            solved.update(results.candidate_solved)
    return solved


def known_solved(events: Iterable[tuple[int, Event[Any]]], suite: str, model: str) -> set[str]:
    """Both sources merged (see the module docstring)."""
    return shipped_solved(suite, model) | logged_solved(events, suite, model)
