"""The evaluation feature's settings: ``[evaluator]`` (what is measured and the gate)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field

from flywheel_loop.engine.config import PluginSection


class EvaluatorConfig(PluginSection):
    """How ``evaluator`` compares a candidate adapter with the model in service, and the gate
    (``plugins/evaluator.py``). Defaults follow the reference design."""

    section_name: ClassVar[str] = "evaluator"

    max_task_drop_points: float = Field(
        default=2.0, ge=0, description="the task pass rate (percent) may be at most this many points lower"
    )
    max_forgetting_rate: float = Field(
        default=0.3, ge=0, le=1, description="the share of forgetting-set items that got worse must stay below"
    )
    forgetting_tolerance: float = Field(
        default=0.05, ge=0, description="an item got worse when its answer loss rose by more than this share"
    )
    max_loss_increase: float | None = Field(
        default=0.05, ge=0, description="held-out loss may be at most this share above the model in service;"
        " none = not gated",
    )
    max_latency_ratio: float | None = Field(
        default=None, gt=0, description="candidate ms/token over the service's; none = reported, not gated"
    )
    canary_check: bool = Field(default=True, description="fail a candidate that reproduces a secret or PII")
    canary_from_train: int = Field(default=8, ge=0, description="training prompts added to the canary prompts")
    max_task_examples: int = Field(default=20, ge=0, description="held-out examples with tests that are run")
    max_new_tokens: int = Field(default=160, ge=1, description="tokens generated per held-out task")
    canary_max_new_tokens: int = Field(default=48, ge=1)
    generation_batch: int = Field(default=8, ge=1)
    test_timeout_s: float = Field(default=10.0, gt=0, description="wall-clock limit of one sandboxed test run")
    test_memory_mb: int = Field(default=512, ge=32, description="address-space limit of one sandboxed test run")
    general_prompts: Path | None = Field(
        default=None, description="JSON lines {prompt, completion} added to the forgetting set; none = the"
        " general prompts shipped in plugins/evaluation/data",
    )
    threads: int | None = Field(default=None, ge=1, description="torch threads; none = torch's default")
