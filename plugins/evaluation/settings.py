"""The evaluation feature's settings: ``[evaluator]`` (what is measured and the gate)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

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
        default=0.3, ge=0, le=1, description="the share of forgetting-set items whose answer loss rose (the secondary,"
        " loss-based forgetting figure) must stay below, where it gates (loss_forgetting)"
    )
    loss_forgetting: Literal["fallback", "gate"] = Field(
        default="fallback", description="fallback: the answer-loss forgetting figure gates only where running the"
        " coding suite could not measure forgetting (no suite, or the model in service solved fewer than"
        " min_suite_solved of its sample); where it could, the loss figure is reported beside it, not gated (the"
        " suite is the forgetting check, the loss figure the secondary one). gate: it always gates too",
    )
    max_suite_forgetting: float = Field(
        default=0.3, ge=0, le=1, description="of the suite problems the model in service solved, the share the"
        " candidate may lose: failed when the interval's low end is above it, ok when its high end is below"
    )
    suite: str | None = Field(
        default="coding_suite", description="the coding suite forgetting is measured on: a shipped suite's name"
        " (plugins/evaluation/data/<name>.jsonl) or the path of a suite file of your own; none = no suite check",
    )
    suite_sample: int = Field(
        default=40, ge=0, description="suite problems run per evaluation (a seeded sample; both models run them);"
        " 0 = no suite check"
    )
    suite_focus: Literal["solved", "any"] = Field(
        default="solved", description="solved: draw the sample first from the problems the model in service is"
        " known to solve (earlier evaluations on the log; the shipped calibration of the default base model),"
        " where forgetting can show, then from the rest; any: a seeded sample of the whole suite",
    )
    gate_tasks: bool = Field(
        default=True, description="false: the task pass rate is measured and reported, not gated (tasks without"
        " tests, say)"
    )
    suite_seed: int | None = Field(
        default=None, description="the sample's seed; none = drawn from the training run's id (one sample per run)"
    )
    suite_max_new_tokens: int = Field(default=256, ge=1, description="tokens generated per suite problem")
    min_suite_solved: int = Field(
        default=5, ge=1, description="fewer suite problems solved by the model in service: forgetting inconclusive"
    )
    min_task_items: int = Field(
        default=10, ge=1, description="fewer paired tasks with tests: the task pass rate check is inconclusive"
    )
    confidence: float = Field(default=0.95, gt=0, lt=1, description="the level of the gate's intervals")
    progress_every_s: float = Field(
        default=2.0, gt=0, description="seconds between evaluation.progressed events while an evaluation runs"
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
    max_task_examples: int = Field(
        default=40, ge=0, description="tasks with tests that are run: the dataset's held-out rows first, then the"
        " role's recorded tasks never trained on, newest first"
    )
    max_new_tokens: int = Field(default=160, ge=1, description="tokens generated per held-out task")
    canary_max_new_tokens: int = Field(default=48, ge=1)
    generation_batch: int = Field(
        default=16, ge=1, description="answers generated together (a small model's tokens cost little more in a batch"
        " on a CPU: 32 task prompts took 110 s in batches of 8, 82 s in 16, 53 s in 32, the same answers)",
    )
    test_timeout_s: float = Field(default=10.0, gt=0, description="wall-clock limit of one sandboxed test run")
    test_memory_mb: int = Field(default=512, ge=32, description="address-space limit of one sandboxed test run")
    general_prompts: Path | None = Field(
        default=None, description="JSON lines {prompt, completion} added to the forgetting set; none = the"
        " general prompts shipped in plugins/evaluation/data",
    )
    threads: int | None = Field(default=None, ge=1, description="torch threads; none = torch's default")
