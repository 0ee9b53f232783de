"""Built-in processor ``sampler``: ``sampling.requested`` in; one ``attempts.sampled`` per task and a
``sampling.completed`` with the round's figures out.

For a request covering log position P it takes the role's recorded tasks with tests up to P (not
forgotten, not held out: ``attempts.select_tasks``), loads the model in service for the role at the
request's position (the base model, or the base with the adapter in service), samples ``k``
answers per task (seeded; ``[sampling]``), runs each answer's code against the task's tests in the
sandbox, and returns the results. The answers travel on the log inside ``attempts.sampled``,
sealed under the task's interaction key like the interaction itself, so the dataset builder
rebuilds its RFT rows from the log alone (a replay never samples again) and forgetting the
task's subject shreds its answers too. The dataset builder builds the role's dataset at the
position of ``sampling.completed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from flywheel_loop.engine.artifacts import ThreadArtifacts
from flywheel_loop.engine.config import Settings
from flywheel_loop.engine.processor import ProcessContext, Processor
from flywheel_loop.plugins.sampling.attempts import (
    Attempt,
    Task,
    answer_hash,
    pass_at_k,
    sample_task,
    select_tasks,
    verify,
)
from flywheel_loop.plugins.sampling.settings import SamplingConfig
from flywheel_loop.plugins.shared.holdout import DEFAULT_SEED, DEFAULT_SHARE
from flywheel_loop.plugins.shared.models import (
    AdapterUnusable,
    BaseModelUnusable,
    base_model_dir,
    load_base,
    torch_threads,
    use_bf16,
)
from flywheel_loop.plugins.shared.routing import Router, RouterUnusable, router_embedder
from flywheel_loop.plugins.shared.service_model import service_model
from flywheel_loop.schemas import AttemptsSampled, Event, SamplingCompleted, SamplingRequested

__all__ = ["NAME", "attempts_sampled", "holdout", "processor", "sample_round"]

log = logging.getLogger(__name__)

NAME = "sampler"


def holdout(settings: Settings) -> tuple[int, float]:
    """(seed, share) of the tasks held out for evaluation: ``sampling.holdout_share`` or the dataset
    builder's ``curation.dataset.forgetting_share``, with ``curation.dataset.seed``."""
    raw = settings.plugin_sections().get("curation") or {}
    curation = raw.model_dump() if isinstance(raw, BaseModel) else dict(raw)
    dataset = curation.get("dataset") or {}
    seed = int(dataset.get("seed", DEFAULT_SEED))
    share = SamplingConfig.of(settings).holdout_share
    return seed, float(share if share is not None else dataset.get("forgetting_share", DEFAULT_SHARE))


def sample_round(
    settings: Settings,
    request_id: str,
    req: SamplingRequested,
    tasks: list[Task],
    version: str,
    adapter: Path | None,
    artifacts: ThreadArtifacts | None = None,
) -> list[AttemptsSampled | SamplingCompleted]:
    """Sample and verify every task with the model ``version`` (base + ``adapter``); the results as events."""
    cfg = SamplingConfig.of(settings)
    k = req.k or cfg.k
    temperature = req.temperature if req.temperature is not None else cfg.temperature
    seed = req.seed if req.seed is not None else cfg.seed
    started = time.monotonic()
    outputs: list[AttemptsSampled | SamplingCompleted] = []

    def completed(detail: str, solved: int = 0, passed: int = 0, p1: float = 0.0) -> SamplingCompleted:
        n = len(outputs)
        return SamplingCompleted(
            role=req.role, request_id=request_id, model_version=version, tasks=n, samples=n * k,
            passed_samples=passed, solved_tasks=solved, pass_at_1=round(p1, 6),
            pass_at_k=round(solved / n, 6) if n else 0.0, k=k, temperature=temperature,
            seconds=round(time.monotonic() - started, 3), detail=detail[:2000],
        )

    if not tasks:
        return [completed(f"no {req.role} tasks with tests up to log position {req.log_position}"
                          " (held-out and forgotten ones left out)")]
    model, tokenizer = load_base(base_model_dir(settings, artifacts))
    to_adapter = [True] * len(tasks)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
        router = Router.load(adapter)  # the model as served: what its router sends away, the base model answers
        if router is not None:
            embed = router_embedder(settings.state_dir, cfg.threads).embed
            to_adapter = router.routes([t.prompt for t in tasks], embed)
    solved = passed_total = 0
    p1 = 0.0
    from flywheel_loop.plugins.shared.inference import for_answering

    bf16 = use_bf16(settings.models.precision, "cpu", settings.state_dir)
    for_answering(model, bf16)  # sampled under bf16 autocast where bf16: the same products, fewer casts
    with torch_threads(cfg.threads):
        for i, (task, mine) in enumerate(zip(tasks, to_adapter, strict=True), 1):
            with contextlib.nullcontext() if mine else model.disable_adapter():
                answers, _ = sample_task(model, tokenizer, task, k, max(temperature, 1e-5), cfg.top_p,
                                         cfg.max_new_tokens, seed, bf16, cfg.stop_after_code)
            attempts = verify(answers, task.tests, cfg.timeout_s, cfg.memory_mb)
            passed = sum(a.passed for a in attempts)
            solved += passed > 0
            passed_total += passed
            p1 += pass_at_k(k, passed, 1)
            outputs.append(attempts_sampled(req.role, request_id, task, version, temperature, seed, attempts))
            log.info("sampled %s task %d/%d: %d of %d answers passed (%d tasks solved so far, %.0fs)",
                     req.role, i, len(tasks), passed, k, solved, time.monotonic() - started)
    n = len(tasks)
    return [*outputs, completed(
        f"{solved} of {n} tasks solved by at least one of {k} answers at temperature {temperature:g}",
        solved, passed_total, p1 / n,
    )]


def attempts_sampled(role: str, request_id: str, task: Task, version: str, temperature: float, seed: int,
                     attempts: list[Attempt]) -> AttemptsSampled:
    """The event of one task's verified answers."""
    return AttemptsSampled(
        role=role, request_id=request_id, interaction_id=task.interaction_id, task_event_id=task.event_id,
        model_version=version, k=len(attempts), passed=sum(a.passed for a in attempts), temperature=temperature,
        seed=seed, hashes=[answer_hash(a.answer) for a in attempts], verdicts=[a.passed for a in attempts],
        timed_out=sum(a.timed_out for a in attempts), answers=[a.answer for a in attempts],
    )


class Sampler:
    """The processor: one round per request (a request whose round is on the log is not sampled again)."""

    async def handle(self, event: Event[Any], ctx: ProcessContext) -> list[Any]:
        req = event.data
        if not isinstance(req, SamplingRequested):
            return []
        cfg = SamplingConfig.of(ctx.settings)
        position = req.log_position
        if ctx.sequence and position >= ctx.sequence:
            position = ctx.sequence - 1  # a request cannot cover what was written after it
        seed, share = holdout(ctx.settings)
        events = await ctx.read_log(("interaction.anonymized", "data.forgotten"), None)
        tasks = select_tasks(events, req.role, position, req.max_tasks or cfg.max_tasks, seed, share)
        try:
            version, adapter = await service_model(ctx, req.role)
        except AdapterUnusable as exc:
            return [SamplingCompleted(role=req.role, request_id=event.id, model_version=f"{req.role}-unknown",
                                      tasks=0, samples=0, passed_samples=0, solved_tasks=0, pass_at_1=0.0,
                                      pass_at_k=0.0, k=req.k or cfg.k, temperature=req.temperature or cfg.temperature,
                                      detail=f"the model in service cannot be loaded here: {exc}"[:2000])]
        ctx.log.info("sampling %d %s tasks with %s", len(tasks), req.role, version)
        artifacts = ctx.artifacts.in_thread() if ctx.artifacts is not None else None
        try:
            return await asyncio.to_thread(sample_round, ctx.settings, event.id, req.model_copy(
                update={"log_position": position}), tasks, version, adapter, artifacts)
        except (BaseModelUnusable, RouterUnusable) as exc:
            return [SamplingCompleted(role=req.role, request_id=event.id, model_version=version, tasks=0, samples=0,
                                      passed_samples=0, solved_tasks=0, pass_at_1=0.0, pass_at_k=0.0,
                                      k=req.k or cfg.k, temperature=req.temperature or cfg.temperature,
                                      detail=str(exc)[:2000])]


def processor(settings: Settings) -> Processor:
    """The sampler processor."""
    return Processor(
        name=NAME,
        consumes=("sampling.requested",),
        handle=Sampler().handle,
        description="samples k answers per recorded task with tests from the model in service and runs them"
        " against the tests in the sandbox",
        batch=1,
        produces=("attempts.sampled", "sampling.completed"),
        stateful=True,  # no tables: the fold knows which requests' rounds are on the log (exactly once)
    )
