"""The demo's agent as a real agent would be: through the gateway, with the official OpenAI client.

After the deployment, the agent no longer learns a URL or a model name: it asks the gateway for the role
(``coder``) with the ``openai`` package, exactly as any OpenAI-compatible agent would, and gets the version in
service (a canary, which the gateway gives a small share of the role's sessions, is asked for by its version's
name, so the after figures are the canary's). The gateway records each call (the served version as its
``model_id``, the answer it returned); the agent runs the task's tests and posts the outcome over HTTP
(``POST /v1/outcomes``) against the response id. So the after figures come from the log with nothing recorded
by the agent itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp

from flywheel_loop.plugins.demo.agent import ROLE, Turn
from flywheel_loop.plugins.demo.tasks import LICENSE_ID, Task

__all__ = ["serves", "work_through_gateway"]


async def serves(base_url: str, role: str, version: str) -> bool:
    """Whether the gateway at ``base_url`` (``.../v1``) knows ``version`` (it lists the versions it serves)."""
    try:
        async with aiohttp.ClientSession() as http, http.get(f"{base_url}/models") as response:
            if response.status != 200:
                return False
            names = {m["id"] for m in (await response.json())["data"]}
    except (aiohttp.ClientError, OSError, KeyError, ValueError):
        return False
    return role in names and version in names


async def work_through_gateway(base_url: str, tasks: list[Task], session: str, max_tokens: int,
                               on_turn: Callable[[Turn], None], model: str = ROLE, concurrency: int = 16) -> list[Turn]:
    """Work ``tasks`` through the gateway at ``base_url`` (``.../v1``); one turn per task, in the tasks' order.
    ``model``: what the agent asks for (the role, which the gateway routes; or one version by its name).
    ``concurrency``: tasks asked at once, as an agent with several workers does (the transformers runtime
    generates greedy requests that arrive together as one batch)."""
    from openai import AsyncOpenAI

    from flywheel_loop.plugins.shared.code import extract_code, follows_convention
    from flywheel_loop.plugins.shared.sandbox import run_tests

    client = AsyncOpenAI(base_url=base_url, api_key="flywheel-demo", max_retries=2, timeout=600)
    slots = asyncio.Semaphore(max(1, concurrency))
    sandboxes = asyncio.Semaphore(2)  # test runs at once: each has a wall-clock limit, and the cores are few

    async def work(task: Task, http: aiohttp.ClientSession) -> Turn:
        async with slots:
            completion = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": task.prompt}], max_tokens=max_tokens,
                temperature=0, user=session,
                # what the SDK's record_interaction said about the task, said to the gateway instead
                extra_headers={"x-flywheel-language": "python", "x-flywheel-project": "flywheel-demo",
                               "x-flywheel-domain": task.domain, "x-flywheel-complexity": "simple"})
        text = (completion.choices[0].message.content or "").strip()
        code = extract_code(text)
        async with sandboxes:
            run = await asyncio.to_thread(run_tests, code, task.tests)
        outcome = {"interaction_id": completion.id, "compiles": run.compiles, "tests_passed": run.passed,
                   "tests_failed": run.failed, "runtime_errors": 0 if run.all_passed else len(run.errors),
                   "errors": [e[:500] for e in run.errors[:10]]}
        async with http.post(f"{base_url}/outcomes", json=outcome) as response:
            if response.status != 202:
                raise RuntimeError(f"the gateway refused the outcome of {task.id}: {await response.text()}")
        turn = Turn(task.id, completion.id, completion.model, run.all_passed,
                    follows_convention(code, LICENSE_ID), corrected=False)
        on_turn(turn)
        return turn

    async with aiohttp.ClientSession() as http, asyncio.TaskGroup() as group:  # a failure cancels the rest
        running = [group.create_task(work(task, http)) for task in tasks]
    return [r.result() for r in running]
