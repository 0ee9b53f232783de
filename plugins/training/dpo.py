"""DPO on the dataset's preference pairs, through TRL's ``DPOTrainer``.

The pairs come from human corrections (``dpo_train`` / ``dpo_validation``: the prompt in the
base model's chat template, ``chosen`` = the correction, ``rejected`` = the agent's answer).
The policy is the PEFT model; with no reference model given, TRL uses the same model with the
adapter switched off as the reference, so no second copy of the weights is held. TRL (with
transformers' ``Trainer`` underneath) writes checkpoints every ``checkpoint_every`` steps under
the run folder and resumes from the newest one; its progress is reported through
``on_progress`` as the SFT loop does, and ``eval_every`` / ``patience`` map to transformers'
evaluation schedule and ``EarlyStoppingCallback`` with the best checkpoint loaded at the end.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from flywheel_loop.plugins.training.dropout import use_seeded_dropout
from flywheel_loop.plugins.training.loop import LoopSettings, Progress, RunResult, WallClockExceeded

__all__ = ["train_dpo"]


def _dataset(pairs: Sequence[dict[str, Any]]) -> Any:
    from datasets import Dataset

    return Dataset.from_list([{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]}
                              for p in pairs])


def train_dpo(
    model: Any,
    tokenizer: Any,
    train: Sequence[dict[str, Any]],
    validation: Sequence[dict[str, Any]],
    cfg: LoopSettings,
    run_dir: Path,
    beta: float,
    max_tokens: int,
    on_progress: Callable[[Progress], None] | None = None,
    on_checkpoint: Callable[[int], None] | None = None,
) -> RunResult:
    """Train the PEFT ``model``'s adapter with DPO on ``train`` pairs; resume from ``run_dir``.
    ``on_checkpoint(step)`` is called after each checkpoint TRL writes."""
    from transformers import EarlyStoppingCallback, TrainerCallback
    from trl import DPOConfig, DPOTrainer  # type: ignore[attr-defined]

    if not train:
        raise ValueError("no preference pairs to train on")
    run_dir.mkdir(parents=True, exist_ok=True)
    evaluate = bool(validation)
    per_step = cfg.batch * cfg.grad_accum
    steps_per_epoch = max(1, -(-len(train) // per_step))
    eval_every = cfg.eval_every or steps_per_epoch
    limit = cfg.max_steps or -1  # -1: the epochs decide
    if cfg.min_steps > steps_per_epoch * cfg.epochs:  # the SFT loop's count: at least min_steps, max_steps caps
        limit = min(cfg.min_steps, cfg.max_steps or cfg.min_steps)
    args = DPOConfig(
        output_dir=str(run_dir / "dpo"),
        beta=beta,
        learning_rate=cfg.lr,
        num_train_epochs=cfg.epochs,
        max_steps=limit,
        per_device_train_batch_size=cfg.batch,
        per_device_eval_batch_size=cfg.batch,
        gradient_accumulation_steps=cfg.grad_accum,
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        max_length=max_tokens,
        bf16=cfg.bf16,
        use_cpu=not _cuda(),
        seed=cfg.seed,
        logging_steps=1,
        save_strategy="steps",
        save_steps=eval_every if evaluate else cfg.checkpoint_every,
        save_total_limit=2,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=eval_every if evaluate else None,
        load_best_model_at_end=evaluate,
        metric_for_best_model="eval_loss" if evaluate else None,
        greater_is_better=False if evaluate else None,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        lr_scheduler_type="linear",
    )
    started = time.monotonic()
    seen: dict[str, Any] = {"loss": None, "val": [], "tokens": 0}

    class Report(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None,
                   **kw: Any) -> None:
            logs = logs or {}
            if "loss" in logs:
                seen["loss"] = float(logs["loss"])
            if "eval_loss" in logs:
                seen["val"].append((state.global_step, float(logs["eval_loss"])))

        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if on_checkpoint is not None:
                on_checkpoint(int(state.global_step))

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            elapsed = time.monotonic() - started
            if on_progress is not None:
                val = seen["val"][-1][1] if seen["val"] and seen["val"][-1][0] == state.global_step else None
                on_progress(Progress(state.global_step, state.max_steps, state.epoch or 0.0,
                                     seen["loss"] if seen["loss"] is not None else float("nan"),
                                     0.0, elapsed, val))
            if cfg.wall_clock_cap_s is not None and elapsed >= cfg.wall_clock_cap_s:
                control.should_save = True
                control.should_training_stop = True
                seen["capped"] = state.global_step

    class WaitForMinSteps(TrainerCallback):
        """Early stopping waits for min_steps, as in the SFT loop (runs after EarlyStoppingCallback)."""

        def on_evaluate(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            # only early stopping's request is undone: the last step and the wall-clock cap still stop
            if state.global_step < min(cfg.min_steps, state.max_steps) and "capped" not in seen:
                control.should_training_stop = False

    callbacks: list[Any] = [Report()]
    if evaluate and cfg.patience is not None:
        callbacks += [EarlyStoppingCallback(early_stopping_patience=cfg.patience), WaitForMinSteps()]
    # as the SFT loop: masks of the same distribution, drawn faster on CPU (where TRL's disable_dropout is
    # on, its default, it sets p = 0 on these too)
    use_seeded_dropout(model)
    trainer = DPOTrainer(model=model, args=args, train_dataset=_dataset(train),
                         eval_dataset=_dataset(validation) if evaluate else None,
                         processing_class=tokenizer, callbacks=callbacks)
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # progress goes through on_progress, not stdout
    resume = any((run_dir / "dpo").glob("checkpoint-*"))
    output = trainer.train(resume_from_checkpoint=True if resume else None)
    state = trainer.state
    if "capped" in seen and state.global_step < state.max_steps:
        raise WallClockExceeded(f"wall-clock cap of {cfg.wall_clock_cap_s:g}s reached after step"
                                f" {state.global_step} of {state.max_steps}")
    duration = time.monotonic() - started
    best_val = min((v for _, v in seen["val"]), default=None)
    best_step = min(seen["val"], key=lambda sv: sv[1])[0] if seen["val"] else None
    return RunResult(
        steps=state.global_step,
        total_steps=state.max_steps,
        train_loss=float(output.training_loss) if output.training_loss is not None else None,
        val_loss=best_val,
        tokens=0,
        tokens_per_s=0.0,
        duration_s=duration,
        losses=[float(h["loss"]) for h in state.log_history if "loss" in h],
        val_losses=list(seen["val"]),
        best_step=best_step,
        stopped_early=state.global_step < state.max_steps,
    )


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())
