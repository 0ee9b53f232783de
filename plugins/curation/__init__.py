"""Curation: from scored evidence to content-addressed datasets.

- processor ``embedder``: every anonymized prompt embedded (all-MiniLM-L6-v2) into LanceDB,
  for near-duplicate removal and diverse rehearsal;
- processor ``training_trigger``: ``training.requested`` per role on volume, drift or by hand;
- processor ``dataset_builder``: for each request, a dataset folder (quality filter, dedupe,
  caps per cell, chat template, corrections as targets and DPO pairs, stratified split,
  forgetting set, rehearsal) and ``dataset.built``; rebuilds the datasets forgotten data was in;
- commands ``flywheel datasets`` (list, show, export); rebuilder ``dataset`` for
  ``flywheel replay --dataset ROLE --until SEQ``;
- settings ``[curation]`` (with ``[curation.trigger]``, ``[curation.dataset]``, ``[curation.embedding]``);
- self-synthesized rehearsal (``ssr.py``, settings ``[ssr]``, opt-in): the base model's own answers to general
  prompts, checked and chosen for diversity, fill the rehearsal share of a role's first dataset.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from flywheel_loop.engine.bus import Bus
from flywheel_loop.engine.config import PluginSection, Settings
from flywheel_loop.engine.extensions import Rebuilder
from flywheel_loop.engine.hookspecs import hookimpl
from flywheel_loop.engine.processor import Processor
from flywheel_loop.plugins.curation.settings import CurationConfig


@hookimpl
def register_settings(register: Callable[[type[PluginSection]], None]) -> None:
    from flywheel_loop.plugins.curation.ssr import SsrConfig

    register(CurationConfig)
    register(SsrConfig)


@hookimpl
def synthesize_rehearsal(
    role: str, examples: list[dict[str, Any]], wanted: int, settings: Settings
) -> list[dict[str, Any]] | None:
    from flywheel_loop.plugins.curation.ssr import SsrConfig, self_synthesize

    if not SsrConfig.of(settings).enabled:
        return None
    return self_synthesize(settings, wanted)


@hookimpl
def register_processors(register: Callable[[Processor], None], settings: Settings) -> None:
    from flywheel_loop.plugins.curation import builder, embedder, trigger

    register(embedder.processor(settings))
    register(trigger.processor(settings))
    register(builder.processor(settings))


async def _rebuild_dataset(settings: Settings, bus: Bus, role: str, until: int) -> tuple[str, Path]:
    from flywheel_loop.plugins.curation.builder import rebuild_dataset

    return await rebuild_dataset(settings, bus, role, until)


@hookimpl
def register_rebuilders(register: Callable[[Rebuilder], None]) -> None:
    register(Rebuilder("dataset", _rebuild_dataset, "a role's dataset, byte for byte, from the log up to a position"))


@hookimpl
def register_commands(cli: typer.Typer) -> None:
    from flywheel_loop.plugins.curation import commands

    commands.register(cli)
