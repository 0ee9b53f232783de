"""``flywheel demo`` (and ``flywheel demo --bandits``)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from flywheel_loop.engine.commands import console, fail, run, settings


def register(app: typer.Typer) -> None:
    """Add ``flywheel demo`` to ``app``."""

    @app.command()
    def demo(
        bandits: Annotated[bool, typer.Option("--bandits", help="the bandit demo: no model, simulated rates")] = False,
        interactions: Annotated[int, typer.Option(help="--bandits: how many simulated agent turns")] = 200,
        state_dir: Annotated[Path | None, typer.Option(help="the run's state folder (default: a new one under"
                                                            " <state_dir>/demo-runs)")] = None,
        train_tasks: Annotated[int | None, typer.Option(min=1, help="work only the first N training tasks")] = None,
        held_out_tasks: Annotated[
            int | None, typer.Option(min=1, help="measure only the first N held-out tasks")
        ] = None,
        as_json: Annotated[bool, typer.Option(
            "--json", help="print the figures as JSON on stdout (progress on stderr): pass rates, adherence,"
            " verdict, times")] = False,
    ) -> None:
        """The whole loop on the embedded defaults: a simulated coding agent on the real base model,
        tested and corrected, then dataset, training, gate and deployment, and before/after figures."""
        from flywheel_loop.plugins.demo.bandits import run_bandit_demo
        from flywheel_loop.plugins.demo.run import DemoError, run_demo

        cfg = settings()
        if bandits:
            run(lambda: run_bandit_demo(cfg, interactions, console))
            return
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
        out = Console(stderr=True) if as_json else console
        try:
            summary = run(lambda: run_demo(cfg, out, state_dir=state_dir, train_limit=train_tasks,
                                           held_out_limit=held_out_tasks))
        except DemoError as exc:
            fail(str(exc), code=1, label="demo stopped")
        if as_json:
            sys.stdout.write(json.dumps(summary.as_dict(), indent=2, default=str) + "\n")
