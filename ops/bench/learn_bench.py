"""Benchmark: does learning from verified attempts (RFT) raise held-out pass@1 on the coding suite?

The coding suite (``plugins/evaluation/data/coding_suite.jsonl``, 258 problems with tests) is split
by ``split_suite`` (seed, half): the **training half** is used only as recorded tasks (sampled,
verified, trained on); the **held-out half** is never sampled nor trained on, only measured.

Each round, with the same code the plugins run:

1. **sample**: ``k`` answers per training task from the current model (the base model, then the
   base with the last round's adapter), temperature ``--temperature``, seeded
   (``plugins/sampling/attempts.sample_task``);
2. **verify**: every answer's code against the task's tests in the sandbox (``verify``);
3. **build**: the dataset builder's recipe (``plugins/curation/recipe.build_dataset``) turns every
   round's verified attempts so far into rows (passing answers, shortest first, at most
   ``rft_per_task`` per task) and pairs, written content-addressed (``store.write_dataset``);
4. **train**: the trainer plugin's ``train_dataset`` (LoRA SFT on the rows) on the base model;
5. **measure**: greedy held-out pass@1 of the new model against the previous one, per problem
   (paired): the difference with a 95 % interval (paired t), problems gained and lost, the exact
   McNemar p-value, and the forgetting figure (held-out problems the previous model solved that the
   new one no longer solves, over those it solved).

The engine's gate and deployer are not run here (every round's adapter goes on to the next round);
the figures say what a gate would have seen. Sizes are flags: on 2 shared CPU cores a full run
(129 training tasks x 8 answers, 129 held-out problems) takes hours.

    bash ops/bench/learn [--train-tasks 32] [--heldout 64] [--k 4] [--rounds 2] [--epochs 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def held_out_passes(model: Any, tokenizer: Any, problems: list[Any], max_new_tokens: int, bf16: bool) -> list[bool]:
    """Greedy answers to every problem, each run against its tests: pass or not, per problem (as the
    evaluator's suite run: at the machine's precision, each answer ending at its closed code block)."""
    from flywheel_loop.plugins.evaluation.generation import chat_prompt, generate
    from flywheel_loop.plugins.shared.code import extract_code
    from flywheel_loop.plugins.shared.sandbox import run_tests

    out: list[bool] = []
    for i in range(0, len(problems), 8):
        chunk = problems[i:i + 8]
        gen = generate(model, tokenizer, [chat_prompt(tokenizer, p.prompt) for p in chunk], max_new_tokens, batch=8,
                       bf16=bf16, stop_after_code=True)
        out += [run_tests(extract_code(t), p.test_code, timeout_s=5, memory_mb=512).all_passed
                for t, p in zip(gen.texts, chunk, strict=True)]
        say(f"  held-out {len(out)}/{len(problems)}: {sum(out)} solved")
    return out


def paired(before: list[bool], after: list[bool]) -> dict[str, Any]:
    """The paired comparison of two pass vectors over the same problems."""
    from scipy import stats

    n = len(before)
    diffs = [int(a) - int(b) for a, b in zip(after, before, strict=True)]
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1)) if n > 1 else 0.0
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n) if n > 1 and sd > 0 else 0.0
    gained = sum(d == 1 for d in diffs)
    lost = sum(d == -1 for d in diffs)
    p = float(stats.binomtest(gained, gained + lost, 0.5).pvalue) if gained + lost else 1.0
    solved_before = sum(before)
    return {
        "before": round(sum(before) / n, 4), "after": round(sum(after) / n, 4),
        "difference": round(mean, 4), "interval_95": [round(mean - half, 4), round(mean + half, 4)],
        "gained": gained, "lost": lost, "mcnemar_p": round(p, 4),
        "forgetting": round(lost / solved_before, 4) if solved_before else 0.0,
        "forgetting_of": solved_before,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train-tasks", type=int, default=32, help="training-half tasks sampled per round")
    ap.add_argument("--heldout", type=int, default=64, help="held-out problems measured")
    ap.add_argument("--k", type=int, default=4, help="answers sampled per task")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--max-new-tokens", type=int, default=192)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--min-steps", type=int, default=0, help="at least this many optimizer steps a round"
                    " ([trainer] min_steps: a round's few rows take more passes)")
    ap.add_argument("--per-task", type=int, default=2, help="passing answers kept per task (rft_per_task)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--state", type=Path, default=Path(".flywheel-bench/learn"), help="state folder (model cache)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if min(args.train_tasks, args.heldout, args.k, args.rounds, args.epochs) < 1:
        ap.error("--train-tasks, --heldout, --k, --rounds and --epochs must be at least 1")

    import numpy as np
    import torch
    from peft import PeftModel

    from flywheel_loop.engine.config import load_settings
    from flywheel_loop.plugins.curation.recipe import Attempts, Evidence, Skip, build_dataset
    from flywheel_loop.plugins.curation.settings import CurationConfig
    from flywheel_loop.plugins.curation.store import write_dataset
    from flywheel_loop.plugins.evaluation.suite import load_suite, sample, split_suite
    from flywheel_loop.plugins.sampling.attempts import Task, pass_at_k, sample_task, verify
    from flywheel_loop.plugins.sampling.settings import SamplingConfig
    from flywheel_loop.plugins.shared.chat_format import load_formatter
    from flywheel_loop.plugins.shared.models import base_model_dir, load_base, use_bf16
    from flywheel_loop.schemas import TrainingFailed

    torch.set_num_threads(args.threads)
    settings = load_settings(
        state_dir=args.state.resolve(),
        curation={"dataset": {"min_examples": 1, "forgetting_share": 0.0, "validation_share": 0.15,
                              "rehearsal_share": 0.0, "rft_per_task": args.per_task, "seed": args.seed}},
        trainer={"epochs": args.epochs, "lr": args.lr, "threads": args.threads, "max_tokens": 512,
                 "early_stopping_patience": None, "seed": args.seed, "min_steps": args.min_steps},
    )
    curation = CurationConfig.of(settings)
    train_half, held_half = split_suite(load_suite(), args.seed, 0.5)
    train_tasks = sample(train_half, args.train_tasks, args.seed)
    held = sample(held_half, args.heldout, args.seed)
    assert not {p.id for p in train_tasks} & {p.id for p in held}
    say(f"coding suite: {len(train_half)} training-half / {len(held_half)} held-out problems;"
        f" sampling {len(train_tasks)} x {args.k}, measuring {len(held)}")
    times: dict[str, float] = {}
    started = time.monotonic()
    model_dir = base_model_dir(settings)
    formatter = load_formatter(None, settings.layout.cache / "tokenizers")
    base, tokenizer = load_base(model_dir)
    bf16 = use_bf16(settings.models.precision, "cpu", settings.state_dir)
    times["load"] = time.monotonic() - started

    t = time.monotonic()
    say("held-out pass@1 of the base model")
    before = held_out_passes(base, tokenizer, held, args.max_new_tokens, bf16)
    base_passes = before
    times["measure_base"] = time.monotonic() - t
    model: Any = base
    every: list[Attempts] = []
    rounds: list[dict[str, Any]] = []
    for r in range(1, args.rounds + 1):
        figures: dict[str, Any] = {"round": r, "seconds": {}}
        t = time.monotonic()
        sampled: list[Attempts] = []
        p1 = 0.0
        solved = 0
        for i, p in enumerate(train_tasks, 1):
            task = Task(p.id, p.id, i, p.prompt, p.test_code)
            answers, _ = sample_task(model, tokenizer, task, args.k, args.temperature, 0.95, args.max_new_tokens,
                                     args.seed + r, bf16, SamplingConfig.of(settings).stop_after_code)
            tv = time.monotonic()
            verdicts = [a.passed for a in verify(answers, p.test_code, timeout_s=5, memory_mb=512)]
            figures["seconds"]["verify"] = figures["seconds"].get("verify", 0.0) + time.monotonic() - tv
            c = sum(verdicts)
            p1 += pass_at_k(args.k, c, 1)
            solved += c > 0
            sampled.append(Attempts(p.id, (f"round{r}-{p.id}",), p.id, p.prompt, p.test_code, "coding-suite",
                                    p.difficulty, tuple(zip(answers, verdicts, strict=True))))
            if i % 4 == 0 or i == len(train_tasks):
                say(f"  round {r} sampled {i}/{len(train_tasks)}: {solved} tasks solved by >= 1 of {args.k}")
        figures["seconds"]["sample"] = time.monotonic() - t - figures["seconds"]["verify"]
        figures["sampler"] = {"tasks": len(train_tasks), "samples": len(train_tasks) * args.k,
                              "pass_at_1": round(p1 / len(train_tasks), 4),
                              f"pass_at_{args.k}": round(solved / len(train_tasks), 4), "solved_tasks": solved}
        every += sampled
        t = time.monotonic()
        evidence = Evidence(role="coder", position=r, interactions=len(train_tasks), attempts=every)
        built = build_dataset(evidence, curation, formatter, lambda ex: np.zeros((len(ex), 384), dtype=np.float32))
        if isinstance(built, Skip):
            figures["dataset"] = f"none: {built.detail}"
            say(f"round {r}: no dataset ({built.detail}); stopping")
            rounds.append(figures)
            break
        digest, path = write_dataset(built, settings.layout.datasets)
        figures["seconds"]["build"] = time.monotonic() - t
        figures["dataset"] = {"hash": digest[:16], "rft_rows": built.sources["rft"],
                              "validation": built.sizes["validation"], "dpo_rft_pairs": built.sources["dpo_rft"],
                              "rft_tasks": built.sizes["rft_tasks"]}
        say(f"round {r}: dataset {digest[:12]} with {built.sources['rft']} rows from {built.sizes['rft_tasks']} tasks;"
            " training")
        t = time.monotonic()
        from flywheel_loop.plugins.training.trainer import train_dataset

        outcome = train_dataset(settings, "coder", digest, path)
        figures["seconds"]["train"] = time.monotonic() - t
        if isinstance(outcome, TrainingFailed):
            figures["training"] = f"failed: {outcome.reason}"
            say(f"round {r}: training failed: {outcome.reason}")
            rounds.append(figures)
            break
        figures["training"] = {"adapter": outcome.adapter_hash[:16], "steps": outcome.steps,
                               "train_loss": outcome.train_loss, "val_loss": outcome.val_loss}
        t = time.monotonic()
        fresh, _ = load_base(model_dir)
        model = PeftModel.from_pretrained(fresh, outcome.path)
        after = held_out_passes(model, tokenizer, held, args.max_new_tokens, bf16)
        figures["seconds"]["measure"] = time.monotonic() - t
        figures["held_out"] = paired(before, after)
        figures["held_out_vs_base"] = paired(base_passes, after)
        figures["seconds"] = {k: round(v, 1) for k, v in figures["seconds"].items()}
        rounds.append(figures)
        say(f"round {r}: held-out pass@1 {figures['held_out']['before']:.3f} -> {figures['held_out']['after']:.3f}"
            f" (difference {figures['held_out']['difference']:+.3f}, 95% {figures['held_out']['interval_95']}),"
            f" forgetting {figures['held_out']['forgetting']:.3f} of {figures['held_out']['forgetting_of']}")
        before = after
    report = {"train_tasks": len(train_tasks), "heldout": len(held), "k": args.k, "temperature": args.temperature,
              "max_new_tokens": args.max_new_tokens, "epochs": args.epochs, "min_steps": args.min_steps,
              "threads": args.threads,
              "base_held_out_pass_at_1": round(sum(base_passes) / len(held), 4),
              "seconds": {k: round(v, 1) for k, v in times.items()}, "rounds": rounds,
              "total_seconds": round(time.monotonic() - started, 1)}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"held-out pass@1 of the base model: {report['base_held_out_pass_at_1']:.3f} on {len(held)} problems"
              f" ({report['seconds']['measure_base']:.0f}s)")
        for f in rounds:
            s = f["sampler"]
            print(f"round {f['round']}: sampled {s['tasks']} tasks x {args.k}: pass@1 {s['pass_at_1']:.3f},"
                  f" pass@{args.k} {s[f'pass_at_{args.k}']:.3f}; dataset {f['dataset']}; training {f.get('training')}")
            if "held_out" in f:
                h, hb = f["held_out"], f["held_out_vs_base"]
                print(f"  held-out pass@1 {h['before']:.3f} -> {h['after']:.3f}: {h['difference']:+.3f}"
                      f" (95% {h['interval_95']}; +{h['gained']} -{h['lost']}, McNemar p {h['mcnemar_p']});"
                      f" vs base {hb['difference']:+.3f} (95% {hb['interval_95']});"
                      f" forgetting {h['forgetting']:.3f} ({h['lost']} of {h['forgetting_of']} solved before)")
            print(f"  seconds: {f['seconds']}")
        print(f"total {report['total_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
