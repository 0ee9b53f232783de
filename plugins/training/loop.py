"""The LoRA training loop: answer-only loss over packed blocks, checkpoints, resume, a cap.

The data order is a function of (seed, epoch), so step ``s`` always trains on the same blocks:
a run resumed from its checkpoint at step ``k`` recomputes the order and goes on with step
``k + 1``. A checkpoint (``<run_dir>/ckpt-<step>``; ``<run_dir>/latest`` names the newest) holds
the trainable weights, the optimizer, the scheduler, the RNG states, the step, the token count,
the time spent and the loss history; ``latest`` is replaced atomically, so a kill leaves either
the old checkpoint or the new one. ``on_checkpoint(step)`` is called after each one is written (the
trainer publishes the run folder to the bus then, so another machine can resume it).

The loop runs through an ``accelerate.Accelerator``: it places the model and the optimizer on the
device (a GPU when there is one), runs the forward passes under its mixed precision (bf16 when
``bf16``), and accumulates the gradients of a step's micro-batches (``no_sync`` until the last, so
processes exchange gradients once per step). Launched as several processes (``accelerate launch``
or ``torchrun``; ``plugins/training/launch.py``), each takes every n-th micro-batch of a step: the
step still covers ``batch * grad_accum`` blocks in the same order and its loss is still the mean over
the step's answer tokens, so the result does not depend on how many processes share it (up to the
order of floating-point sums). Process 0 writes the checkpoints and reports progress.

Every ``eval_every`` steps (default: ``evals_per_epoch`` times an epoch) and at the end, the validation loss is
measured; the best weights so far are kept in ``<run_dir>/best.pt``. After ``patience``
validations without a better loss the run stops early, and whenever the best validation was not
the last one, the best weights are restored before the adapter is stored.

The LoRA layers' dropout draws its masks with ``SeededDropout`` (``plugins/training/dropout.py``):
the same distribution as ``nn.Dropout``, from a faster generator on CPU, as reproducible.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flywheel_loop.plugins.shared.packing import IGNORE, Block, anchored_losses, block_loss, collate, token_losses
from flywheel_loop.plugins.training.dropout import use_seeded_dropout
from flywheel_loop.plugins.training.lean_autocast import lean_autocast

__all__ = [
    "LoopSettings", "Progress", "RunResult", "WallClockExceeded", "block_loss", "make_accelerator", "token_losses",
    "train_loop",
]


class WallClockExceeded(RuntimeError):
    """The run reached its wall-clock cap (its last checkpoint is kept)."""


@dataclass(frozen=True)
class LoopSettings:
    lr: float = 2e-4
    epochs: int = 3
    batch: int = 2
    grad_accum: int = 4
    max_steps: int | None = None
    #: at least this many optimizer steps (more passes over a small train split); max_steps still caps
    min_steps: int = 0
    warmup_steps: int = 0
    checkpoint_every: int = 50
    wall_clock_cap_s: float | None = None
    bf16: bool = False
    seed: int = 0
    weight_decay: float = 0.0
    #: weight of the KL divergence from the base model on the answer tokens (0: plain cross-entropy)
    kl_weight: float = 0.0
    #: optimizer steps between validation losses (None: evals_per_epoch)
    eval_every: int | None = None
    #: validations per epoch when eval_every is None
    evals_per_epoch: int = 1
    #: validations without a better loss before the run stops early (None: never)
    patience: int | None = None
    #: train on the CPU even where there is a GPU
    cpu: bool = False


@dataclass(frozen=True)
class Progress:
    step: int
    total_steps: int
    epoch: float
    loss: float
    tokens_per_s: float
    elapsed_s: float
    val_loss: float | None = None
    #: the run's last step (the last of the schedule, or the one it stopped early after)
    final: bool = False


@dataclass
class RunResult:
    steps: int
    total_steps: int
    train_loss: float | None
    val_loss: float | None
    tokens: int
    tokens_per_s: float
    duration_s: float
    resumed_from: int = 0
    losses: list[float] = field(default_factory=list)
    #: (step, validation loss) of every validation
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    best_step: int | None = None
    stopped_early: bool = False


def make_accelerator(bf16: bool, cpu: bool) -> Any:
    """An ``Accelerator`` for one run: bf16 mixed precision or none, the CPU or the default device. In a process
    that was not launched as one of several, accelerate's process-wide state is reset first: a long-running
    engine trains run after run, with settings that may differ, and accelerate refuses to change them."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        AcceleratorState._reset_state(reset_partial_state=True)  # private, but the documented way to start over
    return Accelerator(cpu=cpu, mixed_precision="bf16" if bf16 else "no")


def _order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def _trainable(model: Any) -> dict[str, torch.Tensor]:
    return {k: p.detach().cpu().clone() for k, p in model.named_parameters() if p.requires_grad}


def _save(run_dir: Path, step: int, model: Any, optimizer: Any, scheduler: Any, state: dict[str, Any]) -> None:
    target = run_dir / f"ckpt-{step:08d}"
    tmp = run_dir / f".tmp-ckpt-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(_trainable(model), tmp / "trainable.pt")
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng},
               tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({**state, "step": step}))
    shutil.rmtree(target, ignore_errors=True)
    os.rename(tmp, target)
    pointer = run_dir / f".latest-{os.getpid()}"
    pointer.write_text(target.name)
    os.replace(pointer, run_dir / "latest")
    for old in run_dir.glob("ckpt-*"):
        if old != target:
            shutil.rmtree(old, ignore_errors=True)


def _load(run_dir: Path, model: Any, optimizer: Any, scheduler: Any) -> dict[str, Any] | None:
    latest = run_dir / "latest"
    if not latest.is_file():
        return None
    folder = run_dir / latest.read_text().strip()
    weights = torch.load(folder / "trainable.pt", map_location="cpu")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in weights.items():
            params[k].copy_(v)
    extra = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    torch.set_rng_state(extra["rng"]["torch"])
    random.setstate(extra["rng"]["python"])
    if "cuda" in extra["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(extra["rng"]["cuda"])
    return dict(json.loads((folder / "state.json").read_text()))


def _save_best(run_dir: Path, model: Any) -> None:
    """The trainable weights of the best validation so far (atomically replaced)."""
    tmp = run_dir / f".best-{os.getpid()}.pt"
    torch.save(_trainable(model), tmp)
    os.replace(tmp, run_dir / "best.pt")


def _load_best(run_dir: Path, model: Any) -> None:
    weights = torch.load(run_dir / "best.pt", map_location="cpu")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in weights.items():
            params[k].copy_(v)


def train_loop(
    model: Any,
    train: Sequence[Block],
    validation: Sequence[Block],
    cfg: LoopSettings,
    run_dir: Path,
    pad_id: int,
    on_progress: Callable[[Progress], None] | None = None,
    on_checkpoint: Callable[[int], None] | None = None,
) -> RunResult:
    """Train the trainable parameters of ``model`` (a PEFT model) on ``train``; resume from the
    checkpoint in ``run_dir`` when there is one. ``on_progress`` is called after every step
    (after that step's checkpoint is written); an exception it raises stops the run there.
    ``on_checkpoint(step)`` is called after each checkpoint. In a run of several processes both are
    called on process 0 only."""
    if not train:
        raise ValueError("no training blocks")
    use_seeded_dropout(model)
    accelerator = make_accelerator(cfg.bf16, cfg.cpu)
    try:
        with lean_autocast(model) if cfg.bf16 else contextlib.nullcontext():
            return _train(accelerator, model, train, validation, cfg, run_dir, pad_id, on_progress, on_checkpoint)
    finally:
        accelerator.free_memory()  # accelerate keeps references to what it prepared


@contextlib.contextmanager
def _unsynced(accelerator: Any, model: Any, last: bool) -> Iterator[None]:
    """Gradients are exchanged between processes on the last micro-batch of a step only."""
    if last:
        yield
    else:
        with accelerator.no_sync(model):
            yield


def _train(
    accelerator: Any,
    model: Any,
    train: Sequence[Block],
    validation: Sequence[Block],
    cfg: LoopSettings,
    run_dir: Path,
    pad_id: int,
    on_progress: Callable[[Progress], None] | None,
    on_checkpoint: Callable[[int], None] | None,
) -> RunResult:
    main = bool(accelerator.is_main_process)
    run_dir.mkdir(parents=True, exist_ok=True)
    per_step = cfg.batch * cfg.grad_accum
    steps_per_epoch = math.ceil(len(train) / per_step)
    total = max(steps_per_epoch * cfg.epochs, cfg.min_steps)
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def schedule(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        return max(0.0, (total - step) / max(1, total - cfg.warmup_steps))

    # the scheduler stays outside accelerate: prepared, it would step once per process
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    inner = accelerator.unwrap_model(wrapped)  # named as in a single process, for checkpoints
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    fresh = {"step": 0, "tokens": 0, "elapsed_s": 0.0, "losses": [], "val_losses": [], "best": None, "bad": 0}
    state = {**fresh, **(_load(run_dir, inner, optimizer, scheduler) or {})}
    start_step = int(state["step"])
    losses: list[float] = list(state["losses"])
    val_losses: list[tuple[int, float]] = [(int(a), float(b)) for a, b in state["val_losses"]]
    best: tuple[int, float] | None = (int(state["best"][0]), float(state["best"][1])) if state["best"] else None
    bad = int(state["bad"])
    tokens = int(state["tokens"])
    spent = float(state["elapsed_s"])
    eval_every = cfg.eval_every or max(1, steps_per_epoch // cfg.evals_per_epoch)
    stopped_early = bool(state.get("stopped_early", False))
    rank, world = int(accelerator.process_index), int(accelerator.num_processes)
    t0 = time.monotonic()
    session_tokens = 0

    def save(done: int, snapshot: dict[str, Any]) -> None:
        if main:
            _save(run_dir, done, inner, optimizer, scheduler, snapshot)
        accelerator.wait_for_everyone()
        if main and on_checkpoint is not None:
            on_checkpoint(done)

    wrapped.train()
    for step in range(start_step, total):
        if stopped_early:
            break
        epoch, j = divmod(step, steps_per_epoch)
        order = _order(len(train), cfg.seed, epoch)[j * per_step : (j + 1) * per_step]
        micro = [order[i : i + cfg.batch] for i in range(0, len(order), cfg.batch)]
        answer_tokens = sum(sum(1 for x in train[i].labels[1:] if x != IGNORE) for i in order)
        mine = micro[rank::world]
        # a process with no micro-batch in this step still joins the gradient exchange, with a zero loss
        runs = mine or micro[:1]
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        step_tokens = 0
        for k, idx in enumerate(runs):
            blocks = [train[i] for i in idx]
            with _unsynced(accelerator, wrapped, last=k == len(runs) - 1):
                with accelerator.autocast():
                    if cfg.kl_weight > 0:
                        loss_sum, _ = anchored_losses(wrapped, collate(blocks, pad_id), False, cfg.kl_weight, inner)
                    else:
                        loss_sum, _ = token_losses(wrapped, collate(blocks, pad_id), False)
                # processes average their gradients, so each scales its share up by their number:
                # the step's gradient is that of the mean loss over all of its answer tokens
                scale = world if mine else 0
                accelerator.backward(loss_sum * scale / max(answer_tokens, 1))
            if mine:
                step_loss += float(loss_sum.detach())
                step_tokens += sum(len(b) for b in blocks)
        if world > 1:
            shared = accelerator.reduce(torch.tensor([step_loss, float(step_tokens)], device=accelerator.device),
                                        reduction="sum")
            step_loss, step_tokens = float(shared[0]), int(shared[1])
        session_tokens += step_tokens
        accelerator.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        done = step + 1
        losses.append(step_loss / max(answer_tokens, 1))
        val: float | None = None
        if validation and (done % eval_every == 0 or done == total):
            with accelerator.autocast():
                val = block_loss(inner, list(validation), pad_id, cfg.batch, False)
            if val is not None:
                val_losses.append((done, val))
                if best is None or val < best[1]:
                    best, bad = (done, val), 0
                    if main:
                        _save_best(run_dir, inner)
                    accelerator.wait_for_everyone()
                else:
                    bad += 1
                    stopped_early = cfg.patience is not None and bad >= cfg.patience and cfg.min_steps <= done < total
        now = time.monotonic() - t0
        rate = session_tokens / now if now > 0 else 0.0
        snapshot = {"tokens": tokens + session_tokens, "elapsed_s": spent + now, "losses": losses,
                    "val_losses": val_losses, "best": best, "bad": bad, "stopped_early": stopped_early}
        if done % cfg.checkpoint_every == 0 or done == total or stopped_early:
            save(done, snapshot)
        if main and on_progress is not None:
            on_progress(Progress(done, total, done / steps_per_epoch, losses[-1], rate, spent + now, val,
                                 final=done == total or stopped_early))
        if cfg.wall_clock_cap_s is not None and spent + now >= cfg.wall_clock_cap_s and done < total:
            save(done, snapshot)
            raise WallClockExceeded(
                f"wall-clock cap of {cfg.wall_clock_cap_s:g}s reached after step {done} of {total}"
            )
    now = time.monotonic() - t0
    last_step = val_losses[-1][0] if val_losses else None
    if best is not None and best[0] != last_step:
        _load_best(run_dir, inner)  # the best validation loss was not the last one: restore it
    val_loss = best[1] if best is not None else None
    if val_loss is None and validation:
        with accelerator.autocast():
            val_loss = block_loss(inner, list(validation), pad_id, cfg.batch, False)
    tail = losses[-max(1, min(len(losses), steps_per_epoch)) :]
    return RunResult(
        steps=len(losses),
        total_steps=total,
        train_loss=sum(tail) / len(tail) if tail else None,
        val_loss=val_loss,
        tokens=tokens + session_tokens,
        tokens_per_s=session_tokens / now if now > 0 and session_tokens else 0.0,
        duration_s=spent + now,
        resumed_from=start_step,
        losses=losses,
        val_losses=val_losses,
        best_step=best[0] if best is not None else None,
        stopped_early=stopped_early,
    )
