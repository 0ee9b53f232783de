"""The sampling feature's settings: ``[sampling]``."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from flywheel_loop.engine.config import PluginSection


class SamplingConfig(PluginSection):
    """How ``sampler`` samples answers to recorded tasks and checks them against the tasks' tests."""

    section_name: ClassVar[str] = "sampling"

    k: int = Field(default=4, ge=1, le=64, description="answers sampled per task")
    temperature: float = Field(default=0.8, gt=0, le=5, description="sampling temperature")
    top_p: float = Field(default=0.95, gt=0, le=1, description="nucleus sampling: the smallest set of tokens with"
                         " this much probability")
    max_new_tokens: int = Field(default=256, ge=8, le=4096, description="tokens an answer may have")
    stop_after_code: bool = Field(
        default=True, description="an answer ends once it has closed a fenced code block and is cut there (the"
        " tests read only the code; the prose after it costs most of the tokens)",
    )
    max_tasks: int = Field(default=256, ge=1, description="tasks sampled per round (the newest first)")
    seed: int = Field(default=0, description="seeds the sampling: a task's answers depend on it, the task, the"
                      " precision (models.precision) and stop_after_code")
    timeout_s: float = Field(default=5.0, gt=0, le=600, description="wall clock an answer's tests may take")
    memory_mb: int = Field(default=512, ge=32, description="address space an answer's test run may use")
    threads: int | None = Field(default=2, ge=1, description="torch threads while sampling; none = every core")
    trigger_new_tasks: int = Field(
        default=0, ge=0, description="request a round when this many new tasks with tests were recorded for a role"
        " since its last round; 0 = only by hand (flywheel train --method rft)",
    )
    trigger_every_h: float = Field(
        default=0.0, ge=0, description="request a round when a new task with tests comes at least this many hours"
        " (by the events' times) after the role's last round, or its first task; 0 = no schedule",
    )
    holdout_share: float | None = Field(
        default=None, ge=0, lt=1, description="share of tasks held out for evaluation, never sampled; none ="
        " curation.dataset.forgetting_share (the dataset builder's hold-out, with its seed)",
    )
