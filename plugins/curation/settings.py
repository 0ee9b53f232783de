"""The curation feature's settings: ``[curation]`` with its trigger, dataset and embedding tables."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, field_validator

from flywheel_loop.engine.config import PluginSection, Section
from flywheel_loop.plugins.shared.embedding import EmbeddingConfig
from flywheel_loop.plugins.shared.holdout import DEFAULT_SEED, DEFAULT_SHARE

#: The reference design's quality bar moves with the task: a simple task passes 0.05 below
#: ``min_reward``, a complex or expert one must clear a higher bar.
DEFAULT_COMPLEXITY_OFFSETS: dict[str, float] = {"simple": -0.05, "moderate": 0.0, "complex": 0.05, "expert": 0.10}


class TriggerConfig(Section):
    """When ``training_trigger`` asks for a training run of a role (``plugins/training_trigger.py``).

    A role is requested when it has ``export_min`` new high-quality examples since its last
    request and ``train_min`` in all, no run of it is in flight and ``min_interval_s`` has passed
    since its last request; or when a drift alarm for it arrives (drift ignores the interval).
    """

    export_min: int = Field(default=100, ge=1, description="new high-quality examples since the role's last request")
    train_min: int = Field(default=500, ge=1, description="high-quality examples of the role in all")
    min_interval_s: float = Field(default=3600.0, ge=0, description="least time between two requests for a role")
    stale_after_s: float = Field(
        default=86_400.0, gt=0, description="a run in flight this long without completing or failing stops blocking"
    )
    on_drift: bool = Field(default=True, description="request a run when drift.detected arrives for a role")




class DatasetConfig(Section):
    """How ``dataset_builder`` turns scored interactions into SFT and DPO datasets."""

    near_duplicate_threshold: float = Field(
        default=0.95, gt=0, le=1, description="cosine similarity of prompt embeddings above which two are duplicates"
    )
    max_per_cell: int = Field(default=500, ge=1, description="examples kept per (role, domain, complexity) cell")
    validation_share: float = Field(default=0.1, ge=0, lt=1, description="validation split, stratified per cell")
    forgetting_share: float = Field(
        default=DEFAULT_SHARE, ge=0, lt=1,
        description="share of interactions held out of every dataset, to measure forgetting",
    )
    forgetting_max: int = Field(default=500, ge=0, description="largest forgetting set")
    rehearsal_share: float = Field(
        default=0.15, ge=0, lt=1, description="share of the training split that is rehearsal"
    )
    min_examples: int = Field(default=10, ge=1, description="fewer new examples than this: no dataset")
    corrections_bypass_quality: bool = Field(
        default=True, description="an interaction with a human correction is kept whatever its reward"
    )
    fence_code_corrections: bool = Field(
        default=True, description="a correction that is bare Python, of an answer that held its code in a fenced"
        " block, is learned fenced like that answer (plugins/shared/code.py in_answer_form): the model learns the"
        " fix, not to drop its answer format. Part of the recipe: a dataset built before it existed replays byte"
        " for byte with it set to false",
    )
    rft_per_task: int = Field(
        default=2, ge=0, le=64, description="passing sampled answers kept per task (attempts.sampled), shortest first"
    )
    rft_pairs_per_task: int = Field(
        default=1, ge=0, le=64, description="DPO pairs per task from sampled answers: a passing against a failing one"
    )
    seed: int = Field(
        default=DEFAULT_SEED, description="seeds splits, hold-outs and k-means (part of the dataset's identity)"
    )
    lineage_in_event: int = Field(
        default=10_000, ge=0, description="event ids listed in dataset.built; the folder always has all"
    )


class CurationConfig(PluginSection):
    """Turning scored evidence into training data: the quality bar, the trigger, the builder."""

    section_name: ClassVar[str] = "curation"

    min_reward: float = Field(default=0.7, ge=0, le=1, description="reward a moderate task needs to be high quality")
    complexity_offsets: dict[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_COMPLEXITY_OFFSETS),
        description="added to min_reward per complexity (an unknown complexity adds 0)",
    )
    trigger: TriggerConfig = Field(default_factory=TriggerConfig)
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    embedding: EmbeddingConfig = Field(default_factory=EmbeddingConfig)

    @field_validator("complexity_offsets")
    @classmethod
    def _complexities(cls, value: dict[str, float]) -> dict[str, float]:
        bad = sorted(set(value) - set(DEFAULT_COMPLEXITY_OFFSETS))
        if bad:
            raise ValueError(f"complexities are {sorted(DEFAULT_COMPLEXITY_OFFSETS)}, got {bad}")
        return {**DEFAULT_COMPLEXITY_OFFSETS, **value}

    def reward_bar(self, complexity: str | None) -> float:
        """The reward an interaction of this complexity needs to count as high quality."""
        offset = self.complexity_offsets.get(complexity, 0.0) if complexity else 0.0
        return round(self.min_reward + offset, 6)  # 0.7 - 0.05 is 0.6499999999999999 in binary

    def is_high_quality(self, reward: float, complexity: str | None) -> bool:
        return reward >= self.reward_bar(complexity)
