"""Privacy: nothing raw goes further than the anonymizer, and a data subject can be forgotten.

- processor ``anonymizer``: raw intake in, scrubbed ``*.anonymized`` events out (secrets and
  personal data replaced by typed placeholders; session and user ids keyed-hashed);
- command ``flywheel forget``: erase a data subject's raw intake and announce ``data.forgotten``;
- hook ``find_sensitive``: other features (the evaluator's canary check) ask what kinds of
  sensitive data a text holds;
- settings ``[anonymizer]``.
"""

from __future__ import annotations

from collections.abc import Callable

import typer

from flywheel_loop.engine.config import PluginSection, Settings
from flywheel_loop.engine.hookspecs import hookimpl
from flywheel_loop.engine.processor import Processor
from flywheel_loop.plugins.privacy.settings import AnonymizerConfig


@hookimpl
def register_settings(register: Callable[[type[PluginSection]], None]) -> None:
    register(AnonymizerConfig)


@hookimpl
def configure(settings: Settings) -> None:
    from flywheel_loop.plugins.privacy.anonymizer import warn_about_default_key

    warn_about_default_key(settings)


@hookimpl
def register_processors(register: Callable[[Processor], None], settings: Settings) -> None:
    from flywheel_loop.plugins.privacy import anonymizer

    register(anonymizer.processor(settings))


@hookimpl
def register_commands(cli: typer.Typer) -> None:
    from flywheel_loop.plugins.privacy import commands

    commands.register(cli)


@hookimpl
def find_sensitive(text: str) -> list[str] | None:
    from flywheel_loop.plugins.privacy.scrubber import scrub

    _, found = scrub(text)
    return sorted(found.elements())
