"""``flywheel demo --bandits``: the engine on the embedded defaults, driven by a simulated agent, no model.

It records interactions with feedback and outcomes through the SDK, lets every enabled
plugin process them, then prints what reached the log and what the bandits learned about
simulated (model, prompt variant) success rates.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from flywheel_loop.engine.app import Engine
from flywheel_loop.engine.config import Settings
from flywheel_loop.engine.connection import open_bus
from flywheel_loop.engine.plugin_host import PluginHost
from flywheel_loop.engine.progress import RateColumn
from flywheel_loop.sdk.bandit import BanditConfig, ModelArm
from flywheel_loop.sdk.recorder import Recorder
from flywheel_loop.sdk.selector import Selector

TASKS = [
    ("Write a function `add(a, b)` that returns the sum.", "def add(a, b):\n    return a + b\n"),
    ("Write `is_even(n)`.", "def is_even(n):\n    return n % 2 == 0\n"),
    ("Write `reverse(s)` that reverses a string.", "def reverse(s):\n    return s[::-1]\n"),
    ("Write `mean(xs)` for a list of numbers.", "def mean(xs):\n    return sum(xs) / len(xs)\n"),
]
WRONG = "def f(*args):\n    return None  # TODO\n"
ROLES = ["coder", "fixer"]
#: The simulated world: how often each (model, prompt variant) gets a task right. The
#: bandits do not see this; they learn it from the rewards the engine derives.
SUCCESS = {
    ("smollm2-135m", "plain"): 0.35,
    ("smollm2-135m", "step-by-step"): 0.55,
    ("qwen2.5-coder-0.5b", "plain"): 0.6,
    ("qwen2.5-coder-0.5b", "step-by-step"): 0.85,
}
DEMO_BANDIT = BanditConfig(
    prompt_variants={role: ["plain", "step-by-step"] for role in ROLES},
    models=[
        ModelArm(name="smollm2-135m", cost_per_token=1e-7, max_complexity="moderate"),
        ModelArm(name="qwen2.5-coder-0.5b", cost_per_token=4e-7, max_complexity="expert"),
    ],
    seed=7,
)


async def _drive(
    rec: Recorder, selector: Selector, n: int, rng: random.Random, progress: Progress
) -> list[tuple[str, str]]:
    """One simulated agent turn per step: choose arms, answer, run the tests, give feedback."""
    task = progress.add_task("simulated agent", total=n)
    chosen: list[tuple[str, str]] = []
    for i in range(n):
        role = rng.choice(ROLES)
        variant = selector.select_prompt(role)
        model = selector.select_model(role, complexity="simple", max_cost_per_token=1e-6)
        chosen.append((model, variant))
        prompt, answer = rng.choice(TASKS)
        good = rng.random() < SUCCESS[(model, variant)]
        iid = await rec.record_interaction(
            session_id=f"session-{i // 10}", user_id=f"dev-{i % 3}", role=role, model_id=model,
            prompt_variant=variant, input=prompt, output=answer if good else WRONG,
            duration_ms=rng.uniform(200, 2000), cost_usd=rng.uniform(0, 0.002), complexity="simple", domain="python",
        )
        passed = rng.randint(4, 5) if good else rng.randint(0, 1)
        await rec.record_outcome(iid, compiles=True, tests_passed=passed, tests_failed=5 - passed, lint_errors=0)
        await rec.record_feedback(
            iid, rating=rng.randint(4, 5) if good else rng.randint(1, 2),
            implicit="accepted" if good else "rejected", time_to_accept_s=rng.uniform(1, 30),
        )
        progress.advance(task)
        if i % 10 == 9:
            await asyncio.sleep(0.05)  # let the engine score what happened, so the bandits learn
    return chosen


def _raw(section: Any) -> Any:
    """A section as configured (a dict), whether or not its owner validated it already."""
    return section.model_dump() if hasattr(section, "model_dump") else (section or {})


async def run_bandit_demo(settings: Settings, interactions: int, console: Console) -> None:
    started = time.monotonic()
    bandit = BanditConfig.model_validate(_raw(settings.plugin_sections().get("bandit")))
    if not bandit.models and not bandit.prompt_variants:
        bandit = DEMO_BANDIT
        settings = settings.with_sections({"bandit": DEMO_BANDIT.model_dump()})
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
            async with Recorder(settings, url=bus.url) as rec, Selector(bandit, settings, url=bus.url) as selector:
                chosen = await _drive(rec, selector, interactions, random.Random(7), progress)
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

        from flywheel_loop.engine.app import projection_path

        idx = next((r.projection for r in engine.runners if r.projection.name == "log_index"), None)
        if idx is not None:
            db = sqlite3.connect(projection_path(settings, idx))
            for typ, count in db.execute("SELECT type, SUM(count) FROM event_counts GROUP BY type ORDER BY type"):
                table.add_row(typ, str(count))
            db.close()
        console.print(table)
        console.print(_learning_table(chosen))
        console.print(f"demo finished in {time.monotonic() - started:.1f}s; state in {settings.state_dir}")



def _learning_table(chosen: list[tuple[str, str]]) -> Table:
    """How often each arm was chosen in the first and the last quarter of the run."""
    quarter = max(len(chosen) // 4, 1)
    first, last = Counter(chosen[:quarter]), Counter(chosen[-quarter:])
    table = Table("model", "prompt variant", "true success rate", "chosen, first quarter", "chosen, last quarter",
                  title="what the bandits learned")
    for arm, rate in sorted(SUCCESS.items(), key=lambda kv: -kv[1]):
        table.add_row(arm[0], arm[1], f"{rate:.0%}", f"{first[arm] / quarter:.0%}", f"{last[arm] / quarter:.0%}")
    return table
