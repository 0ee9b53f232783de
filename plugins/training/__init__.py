"""Training: a LoRA adapter for every built dataset.

- processor ``trainer``: trains (PEFT LoRA; SFT on the answer tokens with packed blocks, or DPO
  on the preference pairs) with checkpoints, exact resume and early stopping, publishing
  ``training.started`` / ``training.progressed`` live and ``training.completed`` (or
  ``training.failed`` with the reason); the adapter is stored by the hash of its weights;
- command ``flywheel train``: request a run and follow it, or train a dataset in this process;
- settings ``[trainer]``.
"""

from __future__ import annotations

from collections.abc import Callable

import typer

from flywheel_loop.engine.config import PluginSection, Settings
from flywheel_loop.engine.hookspecs import hookimpl
from flywheel_loop.engine.processor import Handler, Processor
from flywheel_loop.plugins.shared.deferred import Deferred
from flywheel_loop.plugins.training.settings import TrainerConfig


@hookimpl
def register_settings(register: Callable[[type[PluginSection]], None]) -> None:
    register(TrainerConfig)


def _trainer() -> Handler:
    from flywheel_loop.plugins.training.trainer import Trainer

    return Trainer().handle


def processor(settings: Settings) -> Processor:
    """The trainer processor (``trainer.Trainer`` does the work)."""
    return Processor(
        name="trainer",
        consumes=("dataset.built", "adapter.superseded"),
        handle=Deferred(_trainer),  # its module imports torch: on the first input
        description="trains a LoRA adapter on each built dataset, and on the replacement of one whose adapter in"
        " service was trained on forgotten data (checkpointed, resumable)",
        batch=1,
        produces=("training.completed", "training.failed"),
        stateful=True,
    )


@hookimpl
def register_processors(register: Callable[[Processor], None], settings: Settings) -> None:
    register(processor(settings))


@hookimpl
def register_commands(cli: typer.Typer) -> None:
    from flywheel_loop.plugins.training import commands

    commands.register(cli)
