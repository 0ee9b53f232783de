"""One SFT run as several processes (``trainer.processes`` > 1): one per GPU, or several on a CPU.

The trainer (a worker thread of ``flywheel up --only trainer``, or ``flywheel train --dataset``)
writes a spec (``<run_dir>/.launch.json``: the base model and dataset folders, the run folder,
the settings, the lineage) and starts

    accelerate launch --multi_gpu --num_processes N --mixed_precision bf16|no \\
        -m flywheel_loop.plugins.training.launch <run_dir>/.launch.json        (CUDA)
    python -m torch.distributed.run --standalone --nproc_per_node N \\
        -m flywheel_loop.plugins.training.launch <run_dir>/.launch.json        (CPU: gloo)

Every process loads the base model, builds the same LoRA model (same seed), tokenizes and packs
the same blocks, and runs ``train_loop`` (``loop.py``: each process takes every N-th micro-batch
of a step and the gradients are averaged, so the result is that of one process up to the order of
floating-point sums). Process 0 writes the checkpoints and reports to the trainer on stdout, one
``FLYWHEEL <json>`` line each: ``progress`` after every step; ``checkpoint`` after each checkpoint,
with a tar of the run folder made at once (``<run_dir>/.ckpt-<step>.tar``), which the trainer
publishes to the bus in the background; ``failed`` for a run that cannot train (no examples, out
of memory, its wall-clock cap); ``result`` with the adapter it stored. The trainer turns these into
the same events a run in its own process publishes. A process that crashes ends the launch with a
non-zero status; the trainer raises, and the worker tries the input again later (resuming from the
last checkpoint). When the trainer's process is gone, nobody reads the reports: process 0's next
one fails (a broken pipe), so the launch ends rather than training on unwatched.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

from flywheel_loop.engine.artifacts import pack
from flywheel_loop.plugins.shared.datasets import read_split
from flywheel_loop.plugins.shared.models import BaseModelUnusable, load_base, store_adapter, torch_threads
from flywheel_loop.plugins.shared.packing import pack as pack_blocks
from flywheel_loop.plugins.shared.packing import tokenize_rows
from flywheel_loop.plugins.training.loop import LoopSettings, Progress, WallClockExceeded, train_loop
from flywheel_loop.plugins.training.trainer import fit_router

__all__ = ["PREFIX", "command", "main", "report"]

#: every line of the protocol on process 0's stdout starts with this
PREFIX = "FLYWHEEL "
MODULE = "flywheel_loop.plugins.training.launch"


def command(processes: int, cuda: bool, bf16: bool, spec: Path) -> list[str]:
    """The command that runs the spec as ``processes`` processes: ``accelerate launch`` on GPUs,
    ``torch.distributed.run`` (gloo) on a CPU."""
    if cuda:
        return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                "--num_machines", "1", "--mixed_precision", "bf16" if bf16 else "no", "--dynamo_backend", "no",
                "-m", MODULE, str(spec)]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
            "-m", MODULE, str(spec)]


def report(kind: str, value: Any) -> None:
    """One protocol line on stdout (process 0 only)."""
    sys.stdout.write(PREFIX + json.dumps({kind: value}) + "\n")
    sys.stdout.flush()


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    rank = int(os.environ.get("RANK", "0"))
    main_process = rank == 0
    cfg = spec["trainer"]
    run_dir = Path(spec["run_dir"])
    import torch
    from peft import LoraConfig, get_peft_model

    try:
        model, tokenizer = load_base(Path(spec["base_model"]))
    except BaseModelUnusable as exc:
        if main_process:
            report("failed", str(exc))
        return 0
    dataset = Path(spec["dataset"])
    train = pack_blocks(tokenize_rows(read_split(dataset, "train"), tokenizer, cfg["max_tokens"]), cfg["block_tokens"])
    validation = pack_blocks(tokenize_rows(read_split(dataset, "validation"), tokenizer, cfg["max_tokens"]),
                             cfg["block_tokens"])
    if not train:
        if main_process:
            report("failed", f"dataset {dataset.name} has no training example with answer tokens")
        return 0
    torch.manual_seed(cfg["seed"])
    peft_model = get_peft_model(
        model,
        LoraConfig(r=cfg["r"], lora_alpha=cfg["alpha"], lora_dropout=cfg["dropout"],
                   target_modules=list(cfg["target_modules"]), task_type="CAUSAL_LM"),
    )
    if cfg["gradient_checkpointing"]:
        peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        peft_model.enable_input_require_grads()
    loop_cfg = LoopSettings(**spec["loop"])

    def progressed(p: Progress) -> None:
        report("progress", dataclasses.asdict(p))

    def checkpointed(step: int) -> None:
        archive = run_dir / f".ckpt-{step:08d}.tar"
        files = pack(run_dir, archive) if spec["publish"] else 0
        report("checkpoint", {"step": step, "archive": str(archive) if spec["publish"] else None, "files": files})

    try:
        with torch_threads(cfg["threads"] if loop_cfg.cpu else None):
            result = train_loop(peft_model, train, validation, loop_cfg, run_dir, tokenizer.pad_token_id,
                                progressed, checkpointed)
    except WallClockExceeded as exc:
        if main_process:
            report("failed", str(exc))
        return 0
    except (torch.OutOfMemoryError, MemoryError) as exc:
        if main_process:
            report("failed", f"out of memory: {exc or type(exc).__name__}; lower trainer.batch, block_tokens or"
                             " max_tokens, or turn on trainer.gradient_checkpointing")
        return 0
    if main_process:
        lineage = {**spec["lineage"], "steps": result.steps, "train_loss": result.train_loss,
                   "val_loss": result.val_loss}
        router = fit_router(read_split(dataset, "train"), cfg["threads"]) if cfg.get("route", True) else None
        digest, adapter_dir = store_adapter(peft_model, Path(spec["adapters"]), lineage, router)
        report("result", {"run": dataclasses.asdict(result), "adapter_hash": digest, "path": str(adapter_dir)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
