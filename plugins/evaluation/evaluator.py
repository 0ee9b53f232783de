"""Built-in processor ``evaluator``: ``training.completed`` in, ``evaluation.completed`` out.

It loads the base model once with two variants side by side: the candidate (the run's adapter)
and the model in service for the role (the adapter the ``deployments`` projection says is in
service, or the base model when none is), and measures both on the same items
(``plugins/evaluation``):

- **held-out**: the dataset's validation split: answer loss;
- **tasks**: the task pass rate, paired: the dataset's held-out rows that carry ``tests``, then
  the role's recorded tasks on the log that carry tests (``context.tests``) and no version was
  trained on (not in the train split of any dataset of the role's runs, not forgotten), newest
  first, up to ``evaluator.max_task_examples``; each greedy answer's code is run against its tests
  in a sandboxed subprocess with time and memory limits; per task, did each model pass;
- **forgetting by running code**: a seeded sample of the coding suite (``evaluator.suite``,
  ``suite_sample`` problems; the seed is ``suite_seed`` or drawn from the run id), solved by both:
  the share of the problems the model in service solved that the candidate no longer solves;
- **forgetting by loss** (secondary): the dataset's forgetting split (earlier tasks, never trained
  on) and general prompts (shipped with Flywheel, or ``evaluator.general_prompts``): the share of
  items whose answer loss rose, over both and per part;
- **latency and memory**: milliseconds per generated token, the process's peak RSS, the
  adapter's size;
- **canary**: prompts that invite secrets or personal data, plus a few training prompts; what
  the candidate says is scanned by the plugins that find sensitive data (``find_sensitive``). A kind
  the model in service did not say is a leak when the candidate's training data holds that kind (what
  it could have memorized); a kind its training data does not hold was made up (a phone number asked
  for and invented), counted as ``canary_invented`` and not a failure.

The gate (``plugins/evaluation/gate.py``) turns the figures and the paired outcomes into a verdict
(``passed``, ``failed`` or ``inconclusive``) with one check per figure: its interval and item count.
While it runs, ``evaluation.progressed`` says which step runs, every ``progress_every_s`` seconds.
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
import hashlib
import itertools
import logging
import resource
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

from flywheel_loop.engine.artifacts import ThreadArtifacts
from flywheel_loop.engine.config import Settings
from flywheel_loop.engine.processor import ProcessContext
from flywheel_loop.plugins.evaluation.gate import GateResult, verdict
from flywheel_loop.plugins.evaluation.generation import Generations, chat_prompt, generate
from flywheel_loop.plugins.evaluation.known import known_solved
from flywheel_loop.plugins.evaluation.metrics import (
    DATA,
    ItemLoss,
    TaskResult,
    answer_losses,
    canary_leaks,
    forgetting_rate,
    general_rows,
    held_out_loss,
    task_pass_rate,
)
from flywheel_loop.plugins.evaluation.progress import EvalProgress
from flywheel_loop.plugins.evaluation.routed import (
    Split,
    join_generations,
    join_tasks,
    pick_generations,
    pick_tasks,
    routed,
)
from flywheel_loop.plugins.evaluation.settings import EvaluatorConfig
from flywheel_loop.plugins.evaluation.stats import Paired
from flywheel_loop.plugins.evaluation.suite import SuiteError, focused_sample, open_suite, sample, task_rows
from flywheel_loop.plugins.shared.datasets import DatasetUnusable, dataset_folder, read_split
from flywheel_loop.plugins.shared.inference import for_answering
from flywheel_loop.plugins.shared.models import (
    AdapterUnusable,
    BaseModelUnusable,
    adapter_folder,
    base_model_dir,
    base_model_name,
    load_base,
    read_lineage,
    torch_threads,
)
from flywheel_loop.plugins.shared.routing import Router, RouterUnusable, router_embedder, user_text
from flywheel_loop.plugins.shared.service_model import service_model
from flywheel_loop.schemas import (
    EvaluationCompleted,
    EvaluationProgressed,
    Event,
    GateCheck,
    InteractionAnonymized,
    SuiteResults,
    TrainingCompleted,
)

__all__ = ["Detector", "RecordedTask", "evaluate_run", "recorded_tasks", "suite_seed"]

log = logging.getLogger(__name__)

Figures = dict[str, str | int | float | bool | None]
#: the kinds of secrets and personal data in a text, one entry per finding (None: nothing scans text)
Detector = Callable[[str], list[str] | None]
#: a task recorded on the log: (interaction id, the user's request, its test code)
RecordedTask = tuple[str, str, str]


def recorded_tasks(events: Sequence[tuple[int, Event[Any]]], role: str) -> list[RecordedTask]:
    """The role's recorded tasks that carry tests (``context.tests``), newest first, without the
    forgotten ones (``interaction.anonymized`` and ``data.forgotten`` events, in log order)."""
    forgotten: set[str] = set()
    for _, event in events:
        if event.type == "data.forgotten":
            forgotten.update(event.data.interaction_ids)
    tasks: list[RecordedTask] = []
    for _, event in reversed(events):
        data = event.data
        if not isinstance(data, InteractionAnonymized) or getattr(event, "forgotten", False):
            continue
        rec = data.interaction
        if rec.role != role or not rec.context.tests or data.interaction_id in forgotten:
            continue
        tasks.append((data.interaction_id, rec.input, rec.context.tests))
    return tasks


def suite_seed(cfg: EvaluatorConfig, run_id: str) -> int:
    """The suite sample's seed: the configured one, or one drawn from the run id."""
    if cfg.suite_seed is not None:
        return cfg.suite_seed
    return int.from_bytes(hashlib.sha256(run_id.encode()).digest()[:4], "big")


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
    recorded: Sequence[RecordedTask] = (),
    trained_datasets: Sequence[str] = (),
    emit: Callable[[EvaluationProgressed], None] | None = None,
    known_solved: Collection[str] = (),
) -> EvaluationCompleted:
    """Measure the run's adapter against the model in service (``service``: its adapter folder;
    None: the base model) and apply the gate. ``detect`` finds the kinds of secrets and personal
    data in a text (the ``find_sensitive`` hook); without it the canary check is inconclusive.
    ``artifacts`` (from a worker thread) fetches the adapter, the dataset and the base model when
    this machine lacks them. ``recorded``: the role's recorded tasks with tests (newest first);
    those in the train split of the run's dataset or of ``trained_datasets`` (the role's other
    runs' datasets found here) are left out. ``emit`` publishes ``evaluation.progressed``.
    ``known_solved``: the suite problems the model in service is known to solve (``known.py``), which the
    suite sample is drawn from first (``evaluator.suite_focus``)."""
    cfg = EvaluatorConfig.of(settings)

    def rejected(reason: str) -> EvaluationCompleted:
        log.warning("evaluation of run %s: %s", completed.run_id, reason)
        return EvaluationCompleted(run_id=completed.run_id, role=completed.role, adapter_hash=completed.adapter_hash,
                                   passed=False, verdict="failed", reasons=[f"failed: {reason}"[:2000]])

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
    trained = _trained_ids(settings, [completed.dataset_hash, *trained_datasets])
    fresh = [t for t in recorded if t[0] not in trained]
    try:
        with torch_threads(cfg.threads), EvalProgress(completed.run_id, completed.role, 10, emit,
                                                      cfg.progress_every_s) as progress:
            candidate, baseline, outcome, suite_results = _measure(
                settings, completed.run_id, base, tokenizer, adapter_dir, dataset, service, detect, fresh, progress,
                known_solved)
    except RouterUnusable as exc:
        return rejected(f"a router cannot be used: {exc}")
    return EvaluationCompleted(
        run_id=completed.run_id, role=completed.role, adapter_hash=completed.adapter_hash, candidate=candidate,
        baseline=baseline, passed=outcome.passed, verdict=outcome.verdict,
        reasons=[r[:2000] for r in outcome.reasons],
        checks=[GateCheck(name=c.name, status=c.status, detail=c.detail[:2000], value=c.value, low=c.low,
                          high=c.high, items=c.items, p_value=c.p_value) for c in outcome.checks],
        suite_results=suite_results,
    )


def _trained_ids(settings: Settings, hashes: Sequence[str]) -> set[str]:
    """The row ids of the train splits of the datasets here (a dataset this machine lacks is
    skipped: only the candidate's own dataset is fetched, by ``evaluate_run``)."""
    ids: set[str] = set()
    for digest in dict.fromkeys(hashes):
        try:
            folder = dataset_folder(settings, digest, None)
            ids.update(str(r.get("id")) for r in read_split(folder, "train"))
        except (DatasetUnusable, OSError, ValueError):
            continue
    return ids


def _measure(
    settings: Settings, run_id: str, base: Any, tokenizer: Any, adapter_dir: Path, dataset: Path,
    service_dir: Path | None, detect: Detector | None, recorded: Sequence[RecordedTask], progress: EvalProgress,
    known_solved: Collection[str] = (),
) -> tuple[Figures, Figures, GateResult, SuiteResults | None]:
    from peft import PeftModel

    from flywheel_loop.plugins.shared.models import use_bf16

    cfg = EvaluatorConfig.of(settings)
    model = PeftModel.from_pretrained(base, str(adapter_dir), adapter_name="candidate")
    if service_dir is not None:
        model.load_adapter(str(service_dir), adapter_name="service")
    bf16 = use_bf16(settings.models.precision, "cpu", settings.state_dir)
    # every use below is under bf16 autocast where bf16: the same products, without a cast of each weight per call
    for_answering(model, bf16)

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
    tasks = [r for r in validation if r.get("tests")]
    seen = {str(r.get("id")) for r in tasks}
    from_log = [{"id": i, "prompt": chat_prompt(tokenizer, text), "tests": tests, "text": text}
                for i, text, tests in recorded if i not in seen]
    tasks = (tasks + from_log)[: cfg.max_task_examples]
    suite_rows: list[dict[str, Any]] = []
    suite_missing = ""
    seed = suite_seed(cfg, run_id)
    if cfg.suite is not None and cfg.suite_sample > 0:
        try:
            suite_problems = open_suite(cfg.suite)
            problems = (focused_sample(suite_problems, cfg.suite_sample, seed, known_solved)
                        if cfg.suite_focus == "solved" else sample(suite_problems, cfg.suite_sample, seed))
            suite_rows = task_rows(problems, lambda text: chat_prompt(tokenizer, text))
        except SuiteError as exc:
            suite_missing = str(exc)
            log.warning("evaluation of run %s: %s", run_id, exc)
    canary_texts: list[str | None] = [line for line in (DATA / "canary_prompts.txt").read_text().splitlines()
                                      if line.strip()]
    canaries = [chat_prompt(tokenizer, str(line)) for line in canary_texts]
    from_train = read_split(dataset, "train")[: cfg.canary_from_train]
    canaries += [r["prompt"] for r in from_train]
    canary_texts += [user_text(r) for r in from_train]
    # answers are cut as the run that trained the candidate cut them
    max_tokens = int(read_lineage(adapter_dir).get("hyperparameters", {}).get("max_tokens") or 1024)
    # each model as it is served: an adapter with a router answers what it routes to itself, the base model the
    # rest (routed.py)
    try:
        service_router = Router.load(service_dir) if service_dir is not None else None
    except RouterUnusable as exc:
        raise RouterUnusable(f"the router of the model in service: {exc}") from exc
    routers = {"service": service_router, "candidate": Router.load(adapter_dir)}
    embed = router_embedder(settings.state_dir, cfg.threads).embed if any(routers.values()) else None
    texts = {
        "validation": [user_text(r) for r in validation],
        **{f"forgetting {k}": [user_text(r) for r in rows] for k, rows in forgetting.items()},
        "tasks": [user_text(r) for r in tasks],
        "suite": [user_text(r) for r in suite_rows],
        "canary": canary_texts,
    }

    def split(router: Router | None, prompts: Sequence[str | None]) -> Split:
        if router is None or embed is None:
            return Split.everything(len(prompts))
        return Split(tuple(router.routes(prompts, embed)))

    splits = {name: {kind: split(router, prompts) for kind, prompts in texts.items()}
              for name, router in routers.items()}

    def losses_of(m: Any, rows: list[Any]) -> list[ItemLoss | None]:
        return answer_losses(m, tokenizer, rows, max_tokens, bf16, progress.advance)

    def tasks_of(budget: int) -> Callable[[Any, list[Any]], TaskResult]:
        def run(m: Any, rows: list[Any]) -> TaskResult:
            return task_pass_rate(m, tokenizer, rows, budget, cfg.generation_batch, cfg.test_timeout_s,
                                  cfg.test_memory_mb, bf16, progress.advance)
        return run

    def canary_of(m: Any, prompts: list[Any]) -> Generations:
        return generate(m, tokenizer, prompts, cfg.canary_max_new_tokens, cfg.generation_batch, bf16, progress.advance)

    def pick_rows(items: Any, keep: list[bool]) -> Any:
        return [x for x, k in zip(items, keep, strict=True) if k]

    def measure_variant(name: str, served: dict[str, Any]) -> dict[str, Any]:
        """Every measurement on ``name``; the candidate as it is served (``served``: the base model's results)."""
        who = "in service" if name == "service" else "candidate"

        def measure(kind: str, rows: Sequence[Any], run: Callable[[Any, list[Any]], Any],
                    pick: Callable[[Any, list[bool]], Any], join: Callable[[Split, Any, Any], Any]) -> Any:
            cut = splits[name][kind]

            def on_base(part: list[Any]) -> Any:
                if name == "candidate" and service_dir is None:  # the base model is in service: measured already
                    return pick(served[kind], [not a for a in cut.to_adapter])
                with model.disable_adapter():
                    return run(model, part)

            with variant(name) as m:
                return routed(cut, rows, lambda part: run(m, part), on_base, lambda a, b: join(cut, a, b))

        def size(kind: str, rows: Sequence[Any]) -> int:  # the rows this variant computes
            return splits[name][kind].adapter_rows if name == "candidate" and service_dir is None else len(rows)

        out: dict[str, Any] = {}
        progress.step(f"held-out loss ({who})", size("validation", validation))
        out["validation"] = measure("validation", validation, losses_of, pick_rows, Split.join)
        progress.step(f"forgetting loss ({who})", sum(size(f"forgetting {k}", r) for k, r in forgetting.items()))
        for k, rows in forgetting.items():
            out[f"forgetting {k}"] = measure(f"forgetting {k}", rows, losses_of, pick_rows, Split.join)
        progress.step(f"tasks with tests ({who})", 2 * size("tasks", tasks))
        out["tasks"] = measure("tasks", tasks, tasks_of(cfg.max_new_tokens), lambda r, k: pick_tasks(r, tasks, k),
                               lambda c, x, y: join_tasks(c, tasks, x, y))
        progress.step(f"suite {cfg.suite} ({who})", 2 * size("suite", suite_rows))
        out["suite"] = measure("suite", suite_rows, tasks_of(cfg.suite_max_new_tokens),
                               lambda r, k: pick_tasks(r, suite_rows, k),
                               lambda c, x, y: join_tasks(c, suite_rows, x, y))
        progress.step(f"canary prompts ({who})", size("canary", canaries))
        out["canary"] = measure("canary", canaries, canary_of, pick_generations, join_generations)
        return out

    measured: dict[str, dict[str, Any]] = {}
    figures: dict[str, Figures] = {}
    for name in ("service", "candidate"):
        measured[name] = mine = measure_variant(name, measured.get("service", {}))
        task, suite, canary = mine["tasks"], mine["suite"], mine["canary"]
        tokens = task.generations.tokens + suite.generations.tokens + canary.tokens
        seconds = task.generations.seconds + suite.generations.seconds + canary.seconds
        figures[name] = {
            "held_out_loss": held_out_loss(mine["validation"]),
            "held_out_items": sum(1 for x in mine["validation"] if x is not None),
            "task_pass_rate": task.pass_rate,
            "task_examples": task.examples,
            "task_passed": task.passed,
            "suite_pass_rate": suite.pass_rate,
            "suite_problems": suite.examples,
            "suite_passed": suite.passed,
            "ms_per_token": round(1000 * seconds / tokens, 3) if tokens else None,
        }
    losses = {name: {k: measured[name][f"forgetting {k}"] for k in forgetting} for name in measured}
    said = {name: measured[name]["canary"].texts for name in measured}
    outcomes = {name: measured[name]["tasks"].outcomes for name in measured}
    suite_outcomes = {name: measured[name]["suite"].outcomes for name in measured}
    for name, router in routers.items():  # how much of each measurement an adapter with a router answered
        if router is not None:
            figures[name].update({"routed": True, "tasks_to_adapter": splits[name]["tasks"].adapter_rows,
                                  "suite_to_adapter": splits[name]["suite"].adapter_rows,
                                  "canary_to_adapter": splits[name]["canary"].adapter_rows})
    # one forgetting set (as the reference design has it) for the secondary figure; each part reported too
    rates = {k: forgetting_rate(losses["candidate"][k], losses["service"][k], cfg.forgetting_tolerance)
             for k in forgetting}
    pooled, items = forgetting_rate([x for k in forgetting for x in losses["candidate"][k]],
                                    [x for k in forgetting for x in losses["service"][k]], cfg.forgetting_tolerance)
    leaks = invented = None
    if detect is not None:
        leaks, invented = canary_leaks(canaries, said["candidate"], said["service"], detect,
                                       trained_kinds(dataset, detect))
    for leak in leaks or ():
        log.warning("canary: %s", leak)
    for made_up in invented or ():
        log.info("canary: %s, a kind its training data does not hold (made up, not reproduced)", made_up)
    figures["candidate"].update({
        "forgetting_rate": pooled,
        "forgetting_items": items,
        "forgetting_rate_tasks": rates["tasks"][0],
        "forgetting_rate_general": rates["general"][0],
        "task_recorded": sum(1 for t in tasks if t["id"] not in seen),
        "canary_prompts": len(canaries),
        "canary_leaks": len(leaks) if leaks is not None else None,
        "canary_invented": len(invented) if invented is not None else None,
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "adapter_mb": round(_folder_mb(adapter_dir), 3),
    })
    figures["service"]["model"] = service_dir.name if service_dir is not None else "base"
    model.unload()  # give the base model back without the adapters' layers
    paired_tasks = Paired.of(outcomes["candidate"], outcomes["service"]) if tasks else None
    paired_suite = Paired.of(suite_outcomes["candidate"], suite_outcomes["service"]) if suite_rows else None
    if cfg.suite is not None and cfg.suite_sample > 0 and not suite_rows and not suite_missing:
        suite_missing = f"the sample of suite {cfg.suite} is empty"
    outcome = verdict(figures["candidate"], figures["service"], cfg, paired_tasks, paired_suite, suite_missing)
    for check in outcome.checks:  # the interval figures, for the tables that list figures
        if check.name == "task pass rate" and check.low is not None:
            figures["candidate"].update({"task_delta": check.value, "task_delta_low": check.low,
                                         "task_delta_high": check.high, "task_p_value": check.p_value})
        elif check.name == "forgetting (suite)":
            figures["candidate"].update({"suite_forgetting": check.value, "suite_forgetting_low": check.low,
                                         "suite_forgetting_high": check.high, "suite_solved_in_service": check.items,
                                         "suite_seed": seed})
    results = None
    if suite_rows and cfg.suite is not None:
        ids = [str(r["id"]) for r in suite_rows]
        results = SuiteResults(
            suite=cfg.suite, service=service_key(settings, service_dir), problems=ids,
            candidate_solved=[i for i, ok in zip(ids, suite_outcomes["candidate"], strict=True) if ok],
            service_solved=[i for i, ok in zip(ids, suite_outcomes["service"], strict=True) if ok],
            focused=cfg.suite_focus == "solved" and bool(known_solved),
        )
        figures["candidate"]["suite_known_solved"] = len(set(known_solved) & set(ids))
    return figures["candidate"], figures["service"], outcome, results


def trained_kinds(dataset: Path, detect: Detector) -> set[str]:
    """The kinds of secrets and personal data ``detect`` finds in what a dataset trains on: its train split and
    the preferred answers of its preference pairs (what a candidate could reproduce)."""
    texts = [str(r.get("text") or "") for r in read_split(dataset, "train")]
    texts += [f"{r.get('prompt') or ''}\n{r.get('chosen') or ''}" for r in read_split(dataset, "dpo_train")]
    return {kind for text in texts for kind in detect(text) or ()}


def service_key(settings: Settings, service_dir: Path | None) -> str:
    """How suite results name the model in service: its adapter's hash (the folder's name), or the base
    model's name."""
    return service_dir.name if service_dir is not None else base_model_name(settings)


class Evaluator:
    """The processor: evaluates in a thread; one verdict per training run (the engine remembers it)."""

    name = "evaluator"

    async def handle(self, event: Event[Any], ctx: ProcessContext) -> list[Any]:
        completed = event.data
        if not isinstance(completed, TrainingCompleted):
            return []
        try:
            service = (await service_model(ctx, completed.role))[1]
        except AdapterUnusable as exc:
            return [EvaluationCompleted(
                run_id=completed.run_id, role=completed.role, adapter_hash=completed.adapter_hash, passed=False,
                verdict="failed", reasons=[f"failed: the model in service cannot be measured here: {exc}"[:2000]],
            )]
        detect = ctx.plugins.find_sensitive if ctx.plugins is not None else None
        artifacts = ctx.artifacts.in_thread() if ctx.artifacts is not None else None
        until = ctx.sequence or None
        history = await ctx.read_log(("interaction.anonymized", "data.forgotten"), until)
        cfg = EvaluatorConfig.of(ctx.settings)
        known: set[str] = set()
        if cfg.suite is not None and cfg.suite_focus == "solved":
            evaluations = await ctx.read_log(("evaluation.completed",), until)
            known = known_solved(evaluations, cfg.suite, service_key(ctx.settings, service))
        runs = await ctx.read_log(("training.completed",), until)
        trained = [e.data.dataset_hash for _, e in runs
                   if e.data.role == completed.role and e.data.dataset_hash is not None]
        counter = itertools.count(1)

        def emit(progress: EvaluationProgressed) -> None:
            if ctx.loop is not None and ctx.emitter is not None:
                ctx.emit_threadsafe(progress, next(counter), timeout=10.0)

        outcome = await asyncio.to_thread(evaluate_run, ctx.settings, completed, service, detect, artifacts,
                                          recorded_tasks(history, completed.role), trained, emit, known)
        return [outcome]
