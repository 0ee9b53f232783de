"""An example third-party plugin: which tools agents call, per role, from anonymized events.

Install it (``pip install -e contrib/flywheel-example-plugin``) and ``flywheel up`` runs it;
``plugins.disabled = ["tool_usage"]`` in flywheel.toml turns it off.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

from engine.config import Settings
from engine.hookspecs import hookimpl
from engine.projection import Projection
from schemas import Event


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


@hookimpl
def register_projections(register: Callable[[Projection], None], settings: Settings) -> None:
    register(ToolUsage())
