"""An example third-party plugin, written only against Flywheel's public plugin API.

What it brings, each through a hook:

- settings ``[tool_usage]`` (``register_settings``): which tools count as tests;
- a projection ``tool_usage`` (``register_projections``): calls per (role, tool) from the
  anonymized interactions;
- an assessor ``tool_usage`` (``register_assessors``): ``tool_usage.ran_tests`` is 1 when the
  agent ran one of the configured test tools before answering, 0 when it used tools but no test;
- a command ``flywheel tools`` (``register_commands``): the table of calls per role and tool.

Install it (``pip install -e contrib/flywheel-example-plugin``) and ``flywheel up`` runs it;
``plugins.disabled = ["tool_usage"]`` in flywheel.toml turns it off.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any, ClassVar

import typer
from pydantic import Field

from flywheel_loop.engine.assessment import Assessment, Assessor, Evidence
from flywheel_loop.engine.commands import catch_up_projections, fail, say, settings
from flywheel_loop.engine.config import PluginSection, Settings
from flywheel_loop.engine.hookspecs import hookimpl
from flywheel_loop.engine.projection import Projection
from flywheel_loop.schemas import Event

VERSION = "1.0.0"


class ToolUsageConfig(PluginSection):
    """``[tool_usage]``: what the plugin counts."""

    section_name: ClassVar[str] = "tool_usage"

    test_tools: list[str] = Field(
        default_factory=lambda: ["pytest", "unittest", "tox"], min_length=1,
        description="tool names that run tests",
    )


class ToolUsage(Projection):
    """Calls per (role, tool), and how many interactions used no tool at all."""

    name = "tool_usage"
    consumes = ("interaction.anonymized",)
    tables = """
    CREATE TABLE IF NOT EXISTS tool_calls (
        role TEXT NOT NULL, tool TEXT NOT NULL, calls INTEGER NOT NULL, PRIMARY KEY (role, tool));
    """

    def apply(self, db: sqlite3.Connection, event: Event[Any], seq: int) -> None:
        interaction = event.data.interaction
        tools = [call.name for call in interaction.tool_calls] or ["(none)"]
        for tool in tools:
            db.execute(
                "INSERT INTO tool_calls VALUES (?, ?, 1) ON CONFLICT (role, tool) DO UPDATE SET calls = calls + 1",
                (interaction.role, tool),
            )


def ran_tests(evidence: Evidence, test_tools: list[str]) -> Assessment | None:
    """1 when a test tool ran; 0 when tools ran but none of them tests; None when no tool ran."""
    calls = [call.name for call in evidence.interaction.interaction.tool_calls]
    if not calls:
        return None
    return Assessment(scores={"ran_tests": 1.0 if set(calls) & set(test_tools) else 0.0}, version=VERSION)


@hookimpl
def register_settings(register: Callable[[type[PluginSection]], None]) -> None:
    register(ToolUsageConfig)


@hookimpl
def register_projections(register: Callable[[Projection], None], settings: Settings) -> None:
    register(ToolUsage())


@hookimpl
def register_assessors(register: Callable[[Assessor], None], settings: Settings) -> None:
    tools = ToolUsageConfig.of(settings).test_tools
    register(Assessor("tool_usage", lambda evidence: ran_tests(evidence, tools), VERSION))


@hookimpl
def register_commands(cli: typer.Typer) -> None:
    @cli.command()
    def tools(role: str | None = typer.Option(None, help="only this role")) -> None:
        """Tool calls per role and tool (the example plugin's projection)."""
        cfg = settings()
        catch_up_projections(cfg, [ToolUsage.name])
        path = cfg.layout.projection(ToolUsage.name)
        if not path.exists():
            fail("no tool_usage projection yet: run `flywheel up` first")
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = db.execute("SELECT role, tool, calls FROM tool_calls ORDER BY role, calls DESC, tool").fetchall()
        finally:
            db.close()
        for r, tool, calls in rows:
            if role in (None, r):
                say(f"{r}\t{tool}\t{calls}")
