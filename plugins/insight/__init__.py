"""Insight: what the flywheel shows a person.

- projections ``scores`` (the current score per interaction), ``bandit_state`` (per arm),
  ``anonymization`` (scrubbed items by kind), ``log_index`` (events by type, every rejection) and
  ``dashboard`` (what the web dashboard shows);
- service ``dashboard``: the web dashboard ``flywheel up`` serves (pages from other plugins too,
  through ``register_dashboard_pages``);
- commands ``flywheel dashboard``, ``flywheel stats``, ``flywheel runs``;
- settings ``[dashboard]``.
"""

from __future__ import annotations

from collections.abc import Callable

import typer

from flywheel_loop.engine.config import PluginSection, Settings
from flywheel_loop.engine.hookspecs import hookimpl
from flywheel_loop.engine.projection import Projection
from flywheel_loop.engine.services import Service
from flywheel_loop.plugins.insight.settings import DashboardConfig


@hookimpl
def register_settings(register: Callable[[type[PluginSection]], None]) -> None:
    register(DashboardConfig)


@hookimpl
def register_projections(register: Callable[[Projection], None], settings: Settings) -> None:
    from flywheel_loop.plugins.insight.bandit_state import BanditStateProjection
    from flywheel_loop.plugins.insight.dashboard_view import DashboardView
    from flywheel_loop.plugins.insight.log_index import LogIndex
    from flywheel_loop.plugins.insight.scores import Scores
    from flywheel_loop.plugins.insight.stats import Anonymization

    for projection in (Scores(), BanditStateProjection(), Anonymization(), LogIndex(), DashboardView()):
        register(projection)


@hookimpl
def register_services(register: Callable[[Service], None], settings: Settings) -> None:
    from flywheel_loop.plugins.insight.dashboard.server import dashboard_service

    register(Service("dashboard", dashboard_service, "the web dashboard"))


@hookimpl
def register_commands(cli: typer.Typer) -> None:
    from flywheel_loop.plugins.insight import commands

    commands.register(cli)
