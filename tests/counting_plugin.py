"""A plugin used by the tests: a pass-through processor and a projection that counts.

``python -m tests.counting_plugin URL STATE_DIR`` runs an engine with only this plugin, so a
test can SIGKILL it mid-batch and start it again.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flywheel_loop.engine.app import Engine
from flywheel_loop.engine.bus import Bus
from flywheel_loop.engine.config import Settings, load_settings
from flywheel_loop.engine.hookspecs import hookimpl
from flywheel_loop.engine.plugin_host import PluginHost
from flywheel_loop.engine.processor import ProcessContext, Processor
from flywheel_loop.engine.projection import Projection
from flywheel_loop.schemas import Event, InteractionAnonymized


def pass_through(event: Event[Any], ctx: ProcessContext) -> list[InteractionAnonymized]:
    return [InteractionAnonymized(interaction_id=event.id, interaction=event.data)]


class Counted(Projection):
    """Every pass-through output, by the interaction it came from."""

    name = "counted"
    consumes = ("interaction.anonymized",)
    tables = """
    CREATE TABLE IF NOT EXISTS seen (interaction_id TEXT NOT NULL, seq INTEGER NOT NULL);
    CREATE TABLE IF NOT EXISTS total (one INTEGER PRIMARY KEY, n INTEGER NOT NULL);
    INSERT OR IGNORE INTO total VALUES (1, 0);
    """

    def apply(self, db: sqlite3.Connection, event: Event[Any], seq: int) -> None:
        db.execute("INSERT INTO seen VALUES (?, ?)", (event.data.interaction_id, seq))
        db.execute("UPDATE total SET n = n + 1")


class CountingPlugin:
    @hookimpl
    def register_processors(self, register: Callable[[Processor], None], settings: Settings) -> None:
        register(Processor("pass_through", ("interaction.recorded",), pass_through))

    @hookimpl
    def register_projections(self, register: Callable[[Projection], None], settings: Settings) -> None:
        register(Counted())


def counts(path: Path) -> tuple[int, int, int]:
    """(total applied, distinct interactions, rows) in a Counted store."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'total'").fetchone() is None:
            return 0, 0, 0  # the store was just created: its tables come next
        total = db.execute("SELECT n FROM total").fetchone()[0]
        distinct, rows = db.execute("SELECT COUNT(DISTINCT interaction_id), COUNT(*) FROM seen").fetchone()
        return int(total), int(distinct), int(rows)
    finally:
        db.close()


async def _main(url: str, state_dir: str) -> None:
    settings = load_settings(state_dir=Path(state_dir), nats={"url": url}, worker={"batch": 100})
    bus = await Bus.connect(settings, url)
    await bus.ensure_streams()
    host = PluginHost(settings, load_entry_points=False)
    host.register(CountingPlugin(), "counting")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await Engine(bus, host).run(stop)
    await bus.close()


if __name__ == "__main__":
    asyncio.run(_main(sys.argv[1], sys.argv[2]))
