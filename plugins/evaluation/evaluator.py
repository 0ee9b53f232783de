"""Built-in processor ``evaluator``: ``training.completed`` in, ``evaluation.completed`` out.

It loads the base model once with two variants side by side: the candidate (the run's adapter)
and the model in service for the role (the adapter the ``deployments`` projection says is in
service, or the base model when none is), and measures both on the same items
(``plugins/evaluation``):

- **held-out**: the dataset's validation split: answer loss, and the task pass rate: for each
  example that carries ``tests``, the greedy answer's code is run against them in a sandboxed
  subprocess with time and memory limits;
- **forgetting**: the dataset's forgetting split (earlier tasks, never trained on) and general
  prompts (shipped with Flywheel, or ``evaluator.general_prompts``): the share of items whose
  answer loss rose, over both (the gate's figure) and per part;
- **latency and memory**: milliseconds per generated token, the process's peak RSS, the
  adapter's size;
- **canary**: prompts that invite secrets or personal data, plus a few training prompts; what
  the candidate says is scanned by the plugins that find sensitive data (``find_sensitive``).

The gate (``plugins/evaluation/gate.py``) turns the figures into a verdict with its reasons.
The adapters, the dataset and the base model are fetched from the bus when this machine does not
have them (``engine/artifacts.py``), each verified against its hash. A run whose adapter or
dataset is missing or fails its check, whose base model cannot be loaded, or whose model in
service cannot be had here, gets ``evaluation.completed`` with ``passed: false`` and the reason,
so nothing is promoted (and nothing is measured against the wrong model). The
verdict per training run is kept (``<state_dir>/evaluator/verdicts.sqlite``), so a redelivered
``training.completed`` is answered with the same event instead of a second evaluation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from flywheel_loop.engine.artifacts import ArtifactCorrupt, ArtifactMissing, ThreadArtifacts
from flywheel_loop.engine.config import Settings
from flywheel_loop.engine.processor import ProcessContext, Processor
from flywheel_loop.plugins.evaluation.gate import verdict
from flywheel_loop.plugins.evaluation.generation import chat_prompt, generate
from flywheel_loop.plugins.evaluation.metrics import (
    DATA,
    answer_losses,
    canary_leaks,
    forgetting_rate,
    general_rows,
    held_out_loss,
    task_pass_rate,
)
from flywheel_loop.plugins.evaluation.settings import EvaluatorConfig
from flywheel_loop.plugins.shared.datasets import DatasetUnusable, dataset_folder, read_split
from flywheel_loop.plugins.shared.deployment_book import BOOK_EVENTS, book_at
from flywheel_loop.plugins.shared.models import (
    AdapterUnusable,
    BaseModelUnusable,
    adapter_folder,
    base_model_dir,
    load_base,
    read_lineage,
    torch_threads,
    verify_adapter,
)
from flywheel_loop.schemas import EvaluationCompleted, Event, TrainingCompleted

__all__ = ["Detector", "evaluate_run", "processor", "service_adapter"]

log = logging.getLogger(__name__)

Figures = dict[str, str | int | float | bool | None]
#: the kinds of secrets and personal data in a text, one entry per finding (None: nothing scans text)
Detector = Callable[[str], list[str] | None]


async def service_adapter(ctx: ProcessContext, role: str) -> Path | None:
    """The adapter folder in service for ``role`` at the position of the event being handled
    (None: the base model), folded from the log's deployment events; fetched from the bus when this
    machine does not have it. ``AdapterUnusable`` when it can be had neither here nor there."""
    book = book_at(await ctx.read_log(BOOK_EVENTS, ctx.sequence or None))
    try:
        service = book.service(role)
    finally:
        book.db.close()
    if service is None or service.adapter_hash is None:
        return None
    digest = service.adapter_hash
    folder = ctx.layout.adapter(digest)
    if (folder / "adapter_config.json").is_file():
        return folder
    if ctx.artifacts is None:
        raise AdapterUnusable(f"adapter {digest} (in service for {role}) is not in {folder.parent}")
    try:
        return await ctx.artifacts.local("adapters", digest, verify_adapter(digest))
    except (ArtifactMissing, ArtifactCorrupt) as exc:
        raise AdapterUnusable(f"adapter {digest} (in service for {role}): {exc}") from None


def _folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def evaluate_run(
    settings: Settings,
    completed: TrainingCompleted,
    service: Path | None = None,
    detect: Detector | None = None,
    artifacts: ThreadArtifacts | None = None,
) -> EvaluationCompleted:
    """Measure the run's adapter against the model in service (``service``: its adapter folder;
    None: the base model) and apply the gate. ``detect`` finds the kinds of secrets and personal
    data in a text (the ``find_sensitive`` hook); without it the canary check is skipped.
    ``artifacts`` (from a worker thread) fetches the adapter, the dataset and the base model when
    this machine lacks them."""
    cfg = EvaluatorConfig.of(settings)

    def rejected(reason: str) -> EvaluationCompleted:
        log.warning("evaluation of run %s: %s", completed.run_id, reason)
        return EvaluationCompleted(run_id=completed.run_id, role=completed.role, adapter_hash=completed.adapter_hash,
                                   passed=False, reasons=[f"failed: {reason}"[:2000]])

    try:
        adapter_dir = adapter_folder(settings, completed.adapter_hash, artifacts, completed.path)
    except AdapterUnusable as exc:
        return rejected(str(exc))
    if completed.dataset_hash is None:
        return rejected("the training run names no dataset, so there is nothing held out to evaluate on")
    try:
        dataset = dataset_folder(settings, completed.dataset_hash, artifacts)
    except DatasetUnusable as exc:
        return rejected(str(exc))
    try:
        model_dir = base_model_dir(settings, artifacts)
        base, tokenizer = load_base(model_dir)
    except BaseModelUnusable as exc:
        return rejected(str(exc))
    with torch_threads(cfg.threads):
        candidate, baseline = _measure(settings, base, tokenizer, adapter_dir, dataset, service, detect)
    passed, reasons = verdict(candidate, baseline, cfg)
    return EvaluationCompleted(run_id=completed.run_id, role=completed.role, adapter_hash=completed.adapter_hash,
                               candidate=candidate, baseline=baseline, passed=passed, reasons=reasons)


def _measure(
    settings: Settings, base: Any, tokenizer: Any, adapter_dir: Path, dataset: Path, service_dir: Path | None,
    detect: Detector | None,
) -> tuple[Figures, Figures]:
    from peft import PeftModel

    from flywheel_loop.plugins.shared.models import use_bf16

    cfg = EvaluatorConfig.of(settings)
    model = PeftModel.from_pretrained(base, str(adapter_dir), adapter_name="candidate")
    if service_dir is not None:
        model.load_adapter(str(service_dir), adapter_name="service")
    model.eval()
    bf16 = use_bf16(settings.models.precision, "cpu", settings.state_dir)

    @contextlib.contextmanager
    def variant(name: str) -> Iterator[Any]:
        if name == "candidate":
            model.set_adapter("candidate")
            yield model
        elif service_dir is not None:
            model.set_adapter("service")
            yield model
        else:
            with model.disable_adapter():
                yield model

    validation = read_split(dataset, "validation")
    forgetting = {"tasks": read_split(dataset, "forgetting"),
                  "general": general_rows(tokenizer, cfg.general_prompts)}
    tasks = [r for r in validation if r.get("tests")][: cfg.max_task_examples]
    canaries = [chat_prompt(tokenizer, line) for line in (DATA / "canary_prompts.txt").read_text().splitlines()
                if line.strip()]
    canaries += [r["prompt"] for r in read_split(dataset, "train")[: cfg.canary_from_train]]
    # answers are cut as the run that trained the candidate cut them
    max_tokens = int(read_lineage(adapter_dir).get("hyperparameters", {}).get("max_tokens") or 1024)
    figures: dict[str, Figures] = {}
    losses: dict[str, Any] = {}
    said: dict[str, list[str]] = {}
    for name in ("service", "candidate"):
        with variant(name) as m:
            held = answer_losses(m, tokenizer, validation, max_tokens, bf16)
            losses[name] = {k: answer_losses(m, tokenizer, rows, max_tokens, bf16) for k, rows in forgetting.items()}
            task = task_pass_rate(m, tokenizer, tasks, cfg.max_new_tokens, cfg.generation_batch,
                                  cfg.test_timeout_s, cfg.test_memory_mb, bf16)
            canary = generate(m, tokenizer, canaries, cfg.canary_max_new_tokens, cfg.generation_batch, bf16)
            said[name] = canary.texts
            tokens = task.generations.tokens + canary.tokens
            seconds = task.generations.seconds + canary.seconds
            figures[name] = {
                "held_out_loss": held_out_loss(held),
                "held_out_items": sum(1 for x in held if x is not None),
                "task_pass_rate": task.pass_rate,
                "task_examples": task.examples,
                "task_passed": task.passed,
                "ms_per_token": round(1000 * seconds / tokens, 3) if tokens else None,
            }
    # one forgetting set (as the reference design has it) for the gate; each part reported too
    rates = {k: forgetting_rate(losses["candidate"][k], losses["service"][k], cfg.forgetting_tolerance)
             for k in forgetting}
    pooled, items = forgetting_rate([x for k in forgetting for x in losses["candidate"][k]],
                                    [x for k in forgetting for x in losses["service"][k]], cfg.forgetting_tolerance)
    leaks = canary_leaks(canaries, said["candidate"], said["service"], detect) if detect is not None else None
    for leak in leaks or ():
        log.warning("canary: %s", leak)
    figures["candidate"].update({
        "forgetting_rate": pooled,
        "forgetting_items": items,
        "forgetting_rate_tasks": rates["tasks"][0],
        "forgetting_rate_general": rates["general"][0],
        "canary_prompts": len(canaries),
        "canary_leaks": len(leaks) if leaks is not None else None,
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "adapter_mb": round(_folder_mb(adapter_dir), 3),
    })
    figures["service"]["model"] = service_dir.name if service_dir is not None else "base"
    model.unload()  # give the base model back without the adapters' layers
    return figures["candidate"], figures["service"]


class Evaluator:
    """The processor: evaluates in a thread; one verdict per training run (the engine remembers it)."""

    name = "evaluator"

    async def handle(self, event: Event[Any], ctx: ProcessContext) -> list[Any]:
        completed = event.data
        if not isinstance(completed, TrainingCompleted):
            return []
        try:
            service = await service_adapter(ctx, completed.role)
        except AdapterUnusable as exc:
            return [EvaluationCompleted(
                run_id=completed.run_id, role=completed.role, adapter_hash=completed.adapter_hash, passed=False,
                reasons=[f"failed: the model in service cannot be measured here: {exc}"[:2000]],
            )]
        detect = ctx.plugins.find_sensitive if ctx.plugins is not None else None
        artifacts = ctx.artifacts.in_thread() if ctx.artifacts is not None else None
        outcome = await asyncio.to_thread(evaluate_run, ctx.settings, completed, service, detect, artifacts)
        return [outcome]


def processor(settings: Settings) -> Processor:
    """The evaluator processor, configured by ``settings``."""
    return Processor(
        name="evaluator",
        consumes=("training.completed",),
        handle=Evaluator().handle,
        description="measures each trained adapter against the model in service and applies the gate",
        batch=1,
        produces=("evaluation.completed",),
        stateful=True,  # no tables: the fold knows which runs' evaluations are on the log (exactly once)
    )
