"""``flywheel eval``: a coding suite's pass@1, with its interval, for the model in service or any version.

    flywheel eval --role coder                      # the version in service, a seeded sample of coding_suite
    flywheel eval --role coder --full               # every problem of the suite
    flywheel eval --role coder --adapter base       # the base model alone
    flywheel eval --role coder --adapter <hash> --suite coding_suite --sample 60 --seed 7 --json

The model in service is what the ``deployments`` projection says (caught up from the log first
when the bus answers); the sample is the one the evaluator draws (``plugins/evaluation/suite.py``
``sample``): the same seed gives the same problems. Each problem is answered greedily in the
model's chat template, and the code is run against the problem's tests in the sandbox, as the
gate does (``evaluator.suite_max_new_tokens``, ``test_timeout_s``, ``test_memory_mb``,
``threads``). A bar shows the answers generated and the tests run.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from flywheel_loop.engine.commands import catch_up_projections, console, err, fail, say, settings
from flywheel_loop.engine.config import Settings
from flywheel_loop.plugins.evaluation.settings import EvaluatorConfig
from flywheel_loop.plugins.evaluation.stats import wilson
from flywheel_loop.plugins.evaluation.suite import SuiteError, open_suite, sample, task_rows

__all__ = ["register", "service_version", "suite_pass_at_1"]


def service_version(cfg: Settings, role: str) -> tuple[str, str | None] | None:
    """(model name, adapter hash or None) in service for ``role`` per the ``deployments``
    projection; None when nothing was ever deployed for it (the base model serves)."""
    path = cfg.layout.projection("deployments")
    if not path.is_file():
        return None
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT model_name, adapter_hash FROM service WHERE role = ?", (role,)).fetchone()
    except sqlite3.OperationalError:  # not folded yet
        row = None
    finally:
        db.close()
    return (str(row[0]), row[1]) if row else None


def suite_pass_at_1(cfg: Settings, adapter: Path | None, problems: list[Any],
                    progress: Progress | None = None, route: bool = True) -> dict[str, Any]:
    """Run ``problems`` on the base model with ``adapter`` (None: the base model alone), as it is served: an
    adapter with a router answers the problems its router sends to it, the base model the rest (``route``
    False: the adapter answers every problem)."""
    from flywheel_loop.plugins.evaluation.generation import chat_prompt
    from flywheel_loop.plugins.evaluation.metrics import task_pass_rate
    from flywheel_loop.plugins.evaluation.routed import Split, join_tasks, routed
    from flywheel_loop.plugins.shared.models import base_model_dir, load_base, torch_threads, use_bf16
    from flywheel_loop.plugins.shared.routing import Router, router_embedder

    ev = EvaluatorConfig.of(cfg)
    base, tokenizer = load_base(base_model_dir(cfg))
    model = base
    router = None
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(base, str(adapter))
        router = Router.load(adapter) if route else None
    rows = task_rows(problems, lambda text: chat_prompt(tokenizer, text))
    split = Split.everything(len(rows))
    if router is not None:
        embed = router_embedder(cfg.state_dir, ev.threads).embed
        split = Split(tuple(router.routes([r["text"] for r in rows], embed)))
    task = progress.add_task("answers and tests", total=2 * len(rows)) if progress is not None else None

    def advance(n: int) -> None:
        if progress is not None and task is not None:
            progress.advance(task, n)

    started = time.perf_counter()
    bf16 = use_bf16(cfg.models.precision, "cpu")

    def run(part: list[dict[str, Any]]) -> Any:
        return task_pass_rate(model, tokenizer, part, ev.suite_max_new_tokens, ev.generation_batch,
                              ev.test_timeout_s, ev.test_memory_mb, bf16, advance)

    def on_base(part: list[dict[str, Any]]) -> Any:
        with model.disable_adapter():
            return run(part)

    with torch_threads(ev.threads):
        result = routed(split, rows, run, on_base, lambda a, b: join_tasks(split, rows, a, b))
    low, high = wilson(result.passed, result.examples, ev.confidence)
    return {
        "problems": result.examples, "passed": result.passed,
        "pass_at_1": result.passed / result.examples if result.examples else None,
        "low": low, "high": high, "confidence": ev.confidence,
        "solved": [r["id"] for r, ok in zip(rows, result.outcomes, strict=True) if ok],
        "ms_per_token": result.generations.ms_per_token, "seconds": round(time.perf_counter() - started, 1),
        "routed": router is not None, "to_adapter": split.adapter_rows if adapter is not None else 0,
    }


def register(app: typer.Typer) -> None:
    """Add ``flywheel eval`` to ``app``."""

    @app.command("eval")
    def eval_(
        role: Annotated[str, typer.Option(help="the role whose model in service is measured")],
        suite: Annotated[str | None, typer.Option(help="a shipped suite's name or a suite file (default:"
                                                  " evaluator.suite)")] = None,
        full: Annotated[bool, typer.Option("--full", help="every problem, not a sample")] = False,
        sample_size: Annotated[int | None, typer.Option("--sample", help="problems in the sample"
                                                        " (default: evaluator.suite_sample)")] = None,
        seed: Annotated[int | None, typer.Option(help="the sample's seed (default: evaluator.suite_seed or 0)")]
        = None,
        adapter: Annotated[str | None, typer.Option(help="measure this version instead: an adapter hash, an"
                                                    " adapter folder, or 'base' for the base model")] = None,
        route: Annotated[bool, typer.Option(help="an adapter with a router answers what it routes to itself, the"
                                            " base model the rest, as served; --no-route: the adapter answers"
                                            " every problem")] = True,
        as_json: Annotated[bool, typer.Option("--json")] = False,
    ) -> None:
        """A coding suite's pass@1 with its interval, for the model in service (or any version)."""
        from flywheel_loop.plugins.shared.models import AdapterUnusable, BaseModelUnusable, adapter_folder
        from flywheel_loop.plugins.shared.routing import RouterUnusable

        cfg = settings()
        ev = EvaluatorConfig.of(cfg)
        name = suite or ev.suite or "coding_suite"
        if sample_size is not None and sample_size < 1:
            fail(f"--sample {sample_size}: give at least 1 problem")
        try:
            problems = open_suite(name)
        except SuiteError as exc:
            fail(str(exc))
        chosen_seed = seed if seed is not None else (ev.suite_seed or 0)
        if not full:
            problems = sample(problems, sample_size or ev.suite_sample or 40, chosen_seed)
        folder: Path | None = None
        if adapter is None:
            catch_up_projections(cfg, ["deployments"])
            service = service_version(cfg, role)
            version = service[0] if service else "the base model (nothing deployed)"
            digest = service[1] if service else None
        elif adapter == "base":
            version, digest = "the base model", None
        elif Path(adapter).is_dir():
            version, digest, folder = str(adapter), None, Path(adapter)
        else:
            version, digest = f"adapter {adapter[:12]}", adapter
        try:
            if digest is not None:
                folder = adapter_folder(cfg, digest)
            err.print(f"{name}: {len(problems)} problems on {version} for {role}"
                      + ("" if full else f" (sample seed {chosen_seed})"))
            with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn(), console=err, disable=as_json) as bar:
                figures = suite_pass_at_1(cfg, folder, problems, bar, route)
        except (AdapterUnusable, BaseModelUnusable, RouterUnusable) as exc:
            fail(str(exc))
        figures.update({"suite": name, "role": role, "version": version, "adapter_hash": digest,
                        "seed": None if full else chosen_seed, "full": full})
        if as_json:
            console.print_json(orjson.dumps(figures).decode())
            return
        if figures["pass_at_1"] is None:
            fail("no problem was run")
        say(f"pass@1 {100 * figures['pass_at_1']:.1f}% ({figures['passed']}/{figures['problems']}),"
            f" {100 * ev.confidence:g}% interval {100 * figures['low']:.1f}-{100 * figures['high']:.1f}%"
            f" on {name} for {version} ({figures['seconds']:.0f} s)"
            + (f"; its router sent {figures['to_adapter']} of them to the adapter" if figures["routed"] else ""),
            style="bold")
