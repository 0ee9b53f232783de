"""Replay: rebuild a projection from the log into a fresh store, and compare it with another."""

from __future__ import annotations

import sqlite3
from datetime import datetime
from pathlib import Path
from typing import Any

from flywheel_loop.engine.bus import Bus
from flywheel_loop.engine.projection import Projection, ProjectionRunner


async def rebuild(
    bus: Bus,
    projection: Projection,
    path: Path,
    until_seq: int | None = None,
    until_time: datetime | None = None,
) -> int:
    """Fold the log from its first event into a new file at ``path``; return the position."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    runner = ProjectionRunner(bus, projection, path)
    try:
        return await runner.catch_up(until_seq=until_seq, until_time=until_time)
    finally:
        runner.close()


def snapshot(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every table of a projection store (its tracking row aside), rows sorted."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = [
            r[0]
            for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
            if r[0] != "_position" and not r[0].startswith("sqlite_")
        ]
        return {t: sorted(db.execute(f'SELECT * FROM "{t}"').fetchall(), key=repr) for t in tables}
    finally:
        db.close()


def differences(a: Path, b: Path) -> list[str]:
    """Human-readable differences between two stores of the same projection; [] if equal."""
    sa, sb = snapshot(a), snapshot(b)
    out: list[str] = []
    for table in sorted(set(sa) | set(sb)):
        ra, rb = sa.get(table), sb.get(table)
        if ra is None or rb is None:
            out.append(f"table {table} exists in only one store")
        elif ra != rb:
            only_a = len(set(ra) - set(rb))
            only_b = len(set(rb) - set(ra))
            out.append(f"table {table}: {len(ra)} vs {len(rb)} rows ({only_a} and {only_b} differ)")
    return out
