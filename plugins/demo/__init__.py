"""The demo: the engine turning on the embedded defaults (``flywheel demo``, the main job).

- ``run_demo`` (``run.py``, the default): the end-to-end loop with the real base model: a
  simulated coding agent works small coding tasks (``tasks.toml``), the tests run, a simulated
  human corrects it towards a project convention, and the engine builds a dataset, trains, gates
  and deploys an adapter; before/after figures are read back from the log.
- ``run_bandit_demo`` (``bandits.py``, ``flywheel demo --bandits``): no model; a simulated agent
  whose success rates per (model, prompt variant) the bandits learn.

Like a third-party package it talks to the other features only through events, the documented
settings keys, and the shared library.
"""

from __future__ import annotations

import typer

from flywheel_loop.engine.hookspecs import hookimpl


@hookimpl
def register_commands(cli: typer.Typer) -> None:
    from flywheel_loop.plugins.demo import commands

    commands.register(cli)
