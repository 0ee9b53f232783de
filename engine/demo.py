"""The demo: the engine on the embedded defaults, driven by a simulated coding agent.

It records interactions with feedback and outcomes through the SDK, lets every enabled
plugin process them, then prints what reached the log.
"""

from __future__ import annotations

import asyncio
import random
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from engine.app import Engine
from engine.config import Settings
from engine.connection import open_bus
from engine.plugin_host import PluginHost
from engine.progress import RateColumn
from engine.recorder import Recorder

TASKS = [
    ("Write a function `add(a, b)` that returns the sum.", "def add(a, b):\n    return a + b\n", True),
    ("Write `is_even(n)`.", "def is_even(n):\n    return n % 2 == 0\n", True),
    ("Write `reverse(s)` that reverses a string.", "def reverse(s):\n    return s[::-1]\n", True),
    ("Write `mean(xs)` for a list of numbers.", "def mean(xs):\n    return sum(xs) / len(xs)\n", True),
    ("Write `fact(n)`.", "def fact(n):\n    return n * fact(n - 1)\n", False),
    ("Write `last(xs)` returning the last item.", "def last(xs):\n    return xs[len(xs)]\n", False),
]
MODELS = ["smollm2-135m", "qwen2.5-coder-0.5b"]
VARIANTS = ["plain", "step-by-step"]
ROLES = ["coder", "fixer"]


async def _drive(rec: Recorder, n: int, rng: random.Random, progress: Progress) -> None:
    task = progress.add_task("simulated agent", total=n)
    for i in range(n):
        prompt, answer, good = rng.choice(TASKS)
        iid = await rec.record_interaction(
            session_id=f"session-{i // 10}", user_id=f"dev-{i % 3}", role=rng.choice(ROLES),
            model_id=rng.choice(MODELS), prompt_variant=rng.choice(VARIANTS), input=prompt,
            output=answer, duration_ms=rng.uniform(200, 2000), cost_usd=rng.uniform(0, 0.002),
            complexity=rng.choice(["simple", "moderate"]), domain="python",
        )
        passed = rng.randint(3, 5) if good else rng.randint(0, 2)
        await rec.record_outcome(iid, compiles=True, tests_passed=passed, tests_failed=5 - passed, lint_errors=0)
        await rec.record_feedback(
            iid, rating=rng.randint(4, 5) if good else rng.randint(1, 2),
            implicit="accepted" if good else "modified", time_to_accept_s=rng.uniform(1, 30),
        )
        progress.advance(task)
        if i % 20 == 0:
            await asyncio.sleep(0)


async def run_demo(settings: Settings, interactions: int, console: Console) -> None:
    started = time.monotonic()
    async with open_bus(settings) as bus:
        engine = Engine(bus, PluginHost(settings))
        engine.prepare()
        stop = asyncio.Event()
        running = asyncio.create_task(engine.run(stop))
        console.print(
            f"engine: {', '.join(w.processor.name for w in engine.workers) or 'no processors'}; "
            f"projections: {', '.join(r.projection.name for r in engine.runners)}"
        )
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   RateColumn(), TimeRemainingColumn()]
        with Progress(*columns, console=console) as progress:
            async with Recorder(settings, url=bus.url) as rec:
                await _drive(rec, interactions, random.Random(7), progress)
            wait = progress.add_task("processing", total=None)
            while True:  # until every processor has consumed and acked all it was given
                pending = 0
                for w in engine.workers:
                    info = await bus.js.consumer_info(w.stream_name, w.processor.name)
                    pending += info.num_pending + info.num_ack_pending
                progress.update(wait, description=f"processing ({pending} waiting)")
                if pending == 0:
                    break
                await asyncio.sleep(0.2)
            for r in engine.runners:
                await r.catch_up()
        stop.set()
        await running
        table = Table("event type", "events", title="the log after the demo")
        import sqlite3

        from engine.app import projection_path

        idx = next((r.projection for r in engine.runners if r.projection.name == "log_index"), None)
        if idx is not None:
            db = sqlite3.connect(projection_path(settings, idx))
            for typ, count in db.execute("SELECT type, SUM(count) FROM event_counts GROUP BY type ORDER BY type"):
                table.add_row(typ, str(count))
            db.close()
        console.print(table)
        console.print(f"demo finished in {time.monotonic() - started:.1f}s; state in {settings.state_dir}")

