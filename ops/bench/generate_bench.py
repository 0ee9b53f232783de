"""Benchmark: greedy generation as the engine runs it against transformers' ``generate`` with its defaults.

The demo, the gate, self-synthesized rehearsal and the transformers runtime all answer prompts with
``model.generate`` in left-padded batches; on a 2-core CPU that is about half of the demo's time. Two cases,
each on the same model, prompts (the demo's coding tasks in the base model's chat template), batch, thread
count and token budget, each answer ending once it has closed its code block, as in the demo:

- **version** (a LoRA adapter on the base model, frozen, as the gate and the runtime hold it) at the precision
  ``models.precision`` resolves to: flywheel stores the frozen weights in bf16 where bf16 is chosen and
  generates with ``GrowingCache`` (``plugins/shared/inference.py``); the baseline is ``generate`` with its
  default cache under bf16 autocast over the float32 weights (the engine before this change, and what the
  PEFT and transformers docs show);
- **base** (the base model in float32, as the demo's agent asks it): ``GrowingCache`` against the default
  cache.

Runs alternate (baseline, flywheel, flywheel, baseline, ...) ``--repeats`` times in one process; reported:
the best and median milliseconds per generated token of a batch (a batch step of every row), the answers'
tokens per second, and whether both produced the same tokens (they must: the same products in the same order).

    ops/bench/generate [--json] [--prompts 32] [--batch 16] [--max-new-tokens 160] [--repeats 3]
                       [--threads N] [--precision auto] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(ROOT))  # the random adapter is the test suite's (tests/serving.py)


def _prompts(tokenizer: Any, n: int) -> list[str]:
    from flywheel_loop.plugins.demo.tasks import load_tasks

    tasks = load_tasks()
    return [tokenizer.apply_chat_template([{"role": "user", "content": t.prompt}], tokenize=False,
                                          add_generation_prompt=True) for t in (tasks * (n // len(tasks) + 1))[:n]]


def _version(folder: Path, bf16: bool, stored: bool) -> Any:
    """The base model with a LoRA adapter on every projection (random, so it changes the answers), frozen."""
    from flywheel_loop.plugins.shared.inference import store_frozen_in_bf16
    from tests.serving import random_lora

    peft, _ = random_lora(folder, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                          std=0.02, seed=0, r=16)
    peft.requires_grad_(False)
    peft.eval()
    if bf16 and stored:
        store_frozen_in_bf16(peft)
    return peft


def _run(model: Any, tokenizer: Any, prompts: list[str], args: argparse.Namespace, bf16: bool, growing: bool
         ) -> tuple[float, int, int, list[list[int]]]:
    """(seconds, batch steps, answer tokens, the answers' token ids)."""
    import torch

    from flywheel_loop.plugins.shared.inference import GrowingCache
    from flywheel_loop.plugins.shared.stopping import closed_fence

    seconds, steps, tokens, answers = 0.0, 0, 0, []
    tokenizer.padding_side = "left"
    for i in range(0, len(prompts), args.batch):
        enc = tokenizer(prompts[i : i + args.batch], return_tensors="pt", padding=True, add_special_tokens=False)
        start = enc["input_ids"].shape[1]
        extra = {"cache": GrowingCache()} if growing else {}
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            began = time.perf_counter()
            out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, stopping_criteria=closed_fence(tokenizer, start),
                                 **extra)
            seconds += time.perf_counter() - began
        steps += out.shape[1] - start
        for row in out[:, start:].tolist():
            answer = [t for t in row if t != tokenizer.pad_token_id]
            tokens += len(answer)
            answers.append(answer)
    return seconds, steps, tokens, answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each, alternated")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="models.precision for the version (auto: the measured probe)")
    parser.add_argument("--quick", action="store_true", help="4 prompts, 16 tokens, one run: a smoke run")
    parser.add_argument("--state", default=str(ROOT / ".flywheel"), help="where the converted base model is cached")
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.batch, args.max_new_tokens, args.repeats = 4, 4, 16, 1
    if min(args.prompts, args.batch, args.max_new_tokens, args.repeats) < 1 or (args.threads or 1) < 1:
        parser.error("--prompts, --batch, --max-new-tokens, --repeats and --threads must be at least 1")
    import torch

    from flywheel_loop.plugins.shared.models import load_base, resolve_base_model, use_bf16

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    folder = resolve_base_model(None, Path(args.state))
    bf16 = use_bf16(args.precision, "cpu", Path(args.state))
    base, tokenizer = load_base(folder)
    base.requires_grad_(False)
    base.eval()
    cases = {
        "version": {"baseline": (_version(folder, bf16, stored=False), bf16, False),
                    "flywheel": (_version(folder, bf16, stored=True), bf16, True)},
        "base": {"baseline": (base, False, False), "flywheel": (base, False, True)},
    }
    prompts = _prompts(tokenizer, args.prompts)
    report: dict[str, Any] = {"threads": threads, "precision": "bf16" if bf16 else "fp32", "prompts": args.prompts,
                              "batch": args.batch, "max_new_tokens": args.max_new_tokens, "repeats": args.repeats}
    for case, runs in cases.items():
        timings: dict[str, list[float]] = {"baseline": [], "flywheel": []}
        seconds_of: dict[str, list[float]] = {"baseline": [], "flywheel": []}
        answers: dict[str, list[list[int]]] = {}
        tokens = 0
        for i in range(args.repeats):
            for which in (("baseline", "flywheel") if i % 2 == 0 else ("flywheel", "baseline")):
                model, case_bf16, growing = runs[which]
                seconds, steps, tokens, answers[which] = _run(model, tokenizer, prompts, args, case_bf16, growing)
                timings[which].append(1000 * seconds / steps)
                seconds_of[which].append(seconds)
                if not args.json:
                    print(f"{case} {which}: {1000 * seconds / steps:.1f} ms per batch step", file=sys.stderr)
        for which, ms in timings.items():
            report[f"{case}_{which}_ms_per_step"] = round(min(ms), 2)
            report[f"{case}_{which}_ms_per_step_median"] = round(statistics.median(ms), 2)
            report[f"{case}_{which}_tokens_per_s"] = round(tokens / min(seconds_of[which]), 1)
        report[f"{case}_speedup"] = round(min(timings["baseline"]) / min(timings["flywheel"]), 3)
        report[f"{case}_same_tokens"] = answers["baseline"] == answers["flywheel"]
        report[f"{case}_answer_tokens"] = tokens
    if args.json:
        print(json.dumps(report))
        return
    print(f"greedy generation, {args.prompts} demo prompts in batches of {args.batch}, up to {args.max_new_tokens}"
          f" tokens, {threads} threads, best of {args.repeats} (alternated)")
    for case, label in (("version", f"LoRA version, {report['precision']}"), ("base", "base model, fp32")):
        print(f"  {label}: flywheel {report[f'{case}_flywheel_ms_per_step']} ms per batch step (median"
              f" {report[f'{case}_flywheel_ms_per_step_median']}), baseline {report[f'{case}_baseline_ms_per_step']}"
              f" (median {report[f'{case}_baseline_ms_per_step_median']}): {report[f'{case}_speedup']}x;"
              f" same tokens: {report[f'{case}_same_tokens']}")


if __name__ == "__main__":
    main()
