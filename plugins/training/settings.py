"""The training feature's settings: ``[trainer]``."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from flywheel_loop.engine.config import PluginSection


class TrainerConfig(PluginSection):
    """How ``trainer`` turns a dataset into a LoRA adapter (``plugins/lora_trainer.py``)."""

    section_name: ClassVar[str] = "trainer"

    r: int = Field(default=16, ge=1, le=1024, description="LoRA rank (by dataset size unless set: size_defaults)")
    alpha: float = Field(
        default=32.0, gt=0, description="LoRA alpha (the update is scaled by alpha / r); unless set, 2 x r"
    )
    dropout: float = Field(default=0.1, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1
    )
    lr: float = Field(default=2e-4, gt=0, description="peak learning rate (by dataset size unless set)")
    epochs: int = Field(default=3, ge=1, description="passes over the train split (by dataset size unless set)")
    size_defaults: bool = Field(
        default=True, description="epochs, lr, r and alpha that [trainer] does not set are picked by the size of"
        " the train split (SIZE_DEFAULTS); false = the plain defaults",
    )
    batch: int = Field(default=2, ge=1, description="packed blocks per forward pass")
    grad_accum: int = Field(default=4, ge=1, description="forward passes per optimizer step")
    max_steps: int | None = Field(default=None, ge=1, description="stop after this many optimizer steps")
    min_steps: int = Field(
        default=0, ge=0, description="at least this many optimizer steps: a train split too small for them in"
        " `epochs` passes takes more passes; early stopping waits for them, validation still chooses the weights"
        " kept, max_steps still caps. For rounds of verified attempts, whose"
        " datasets are tens of rows. 0 = epochs alone",
    )
    warmup_steps: int = Field(default=0, ge=0)
    max_tokens: int = Field(default=1024, ge=8, description="an example is cut to this many tokens")
    block_tokens: int = Field(
        default=512, ge=8, description="tokens per packed block (an example longer than a block gets its own);"
        " on SmolLM2-135M/CPU 512-token blocks trained 1.3x faster than 1024 (attention grows with the square)",
    )
    checkpoint_every: int = Field(default=50, ge=1, description="optimizer steps between checkpoints")
    wall_clock_cap_s: float | None = Field(default=None, gt=0, description="a run that takes longer fails")
    progress_every: int = Field(
        default=10, ge=1, description="steps between training.progressed events (or sooner: progress_every_s)"
    )
    progress_every_s: float | None = Field(
        default=2.0, gt=0, description="at most this many seconds of training between two training.progressed"
        " events, so a bar moves while steps are slow (a step is reported when it ends: a single step longer"
        " than this is reported as soon as it ends); none = by step count only",
    )
    threads: int | None = Field(
        default=None,
        ge=1,
        description="torch threads on CPU; none = torch's default, every core (training SmolLM2-135M here,"
        " 2 threads ran 1.3-2x faster than 1)",
    )
    gradient_checkpointing: bool = Field(default=False, description="recompute activations: less memory, slower")
    processes: int = Field(
        default=1, ge=1, le=64, description="processes per SFT run on this machine: above 1 each run is launched as"
        " that many processes sharing every step (one per GPU with accelerate launch --multi_gpu; on a CPU with"
        " torch.distributed.run and gloo); the result does not depend on it, so it is not part of the run id",
    )
    seed: int = 0
    eval_every: int | None = Field(
        default=None, ge=1, description="optimizer steps between validation losses; none = evals_per_epoch"
    )
    evals_per_epoch: int = Field(
        default=2, ge=1, le=1000, description="validations per epoch when eval_every is not set (with the"
        " default patience of 2, a run stops after an epoch without a better validation loss)",
    )
    early_stopping_patience: int | None = Field(
        default=2, ge=1, description="stop after this many validations without a better loss (the best weights"
        " are restored); none = never stop early",
    )
    kl_weight: float = Field(
        default=0.0, ge=0, description="SFT: add this weight times the KL divergence from the base model's"
        " next-token distribution on the answer tokens (the base model is the model with its adapter off: one"
        " more forward pass a step). On the demo's data, weight 1 lost 5 of 23 suite problems instead of 8 and"
        " learned 4 of 12 validation tasks instead of 7 (README, The demo). 0 = plain cross-entropy",
    )
    route: bool = Field(
        default=True, description="store a router with the adapter (plugins/shared/routing.py): the gate and the"
        " server send a request to the adapter when its prompt is nearer to the role's training prompts than to"
        " the self-synthesized rehearsal's general ones, and to the base model otherwise (a dataset without"
        " rehearsal rows gets no router: the adapter answers everything). false = the adapter answers everything",
    )
    method: Literal["sft", "dpo"] = Field(
        default="sft", description="sft on the train split, or dpo on the preference pairs (dpo_train)"
    )
    dpo_beta: float = Field(default=0.1, gt=0, description="DPO's beta: how far the policy may move from the base")


#: (most train rows, epochs, lr, LoRA r) for a dataset of up to that many rows, first match. Anchored on the demo
#: (about 50 train rows, where 3 epochs at 3e-4 with r 16 is what it trains and what taught its convention);
#: bigger datasets take fewer passes and a lower rate, and the largest more rank. The rows above 100 are a
#: reasoned extrapolation, not a measurement (see README, "Training on small datasets").
SIZE_DEFAULTS: tuple[tuple[float, int, float, int], ...] = (
    (100, 3, 3e-4, 16),
    (300, 3, 2e-4, 16),
    (1000, 2, 2e-4, 16),
    (float("inf"), 1, 2e-4, 32),
)


def sized(cfg: TrainerConfig, rows: int) -> TrainerConfig:
    """``cfg`` with the epochs, learning rate, rank and alpha it does not set picked for ``rows`` train rows
    (``SIZE_DEFAULTS``); unchanged when ``size_defaults`` is off."""
    if not cfg.size_defaults:
        return cfg
    _, epochs, lr, r = next(row for row in SIZE_DEFAULTS if rows <= row[0])
    chosen: dict[str, Any] = {"epochs": epochs, "lr": lr, "r": r}
    update = {k: v for k, v in chosen.items() if k not in cfg.model_fields_set}
    if "alpha" not in cfg.model_fields_set:
        update["alpha"] = 2.0 * update.get("r", cfg.r)
    return cfg.model_copy(update=update)
