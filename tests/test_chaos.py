"""The chaos suite, shortened: 20 s of load at 300 events/s through the built-in pipeline
while a worker is SIGKILLed every 5 s and the NATS server restarts once.

Not in the default run (marked ``slow`` and ``chaos``): ``bash ops/test --slow -m chaos``,
or the full two minutes at 1,000 events/s with ``bash ops/chaos``.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from tests.chaos import ChaosOptions, print_report, run_chaos

pytestmark = [pytest.mark.chaos, pytest.mark.slow]


@pytest.mark.timeout(900)
async def test_kills_and_a_server_restart_lose_nothing_and_double_nothing(tmp_path: Path) -> None:
    opts = ChaosOptions(rate=300, duration=20, kill_every=5, workers=2, seed=7, work_dir=tmp_path / "chaos",
                        show_progress=False)
    out = io.StringIO()
    console = Console(file=out, width=120)
    report = await run_chaos(opts, console)
    print_report(report, console)
    summary = out.getvalue()
    assert len(report.kills) >= 3, summary  # the chaos happened: kills every 5 s ...
    assert report.nats_restarts == 1, summary  # ... and one server restart
    assert report.produced["interaction.recorded"] > 0 and report.produced["feedback.given"] > 0, summary
    assert report.ok, summary  # every event once, every output once, projections = replay
