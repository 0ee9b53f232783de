"""Rounds of learning from verified attempts, folded from the log: sample -> build -> train -> gate -> deploy
(``flywheel rounds`` of the sampling feature, and ``flywheel runs`` of the insight feature, show them).

A round starts with a ``sampling.completed`` (the sampler's figures); its dataset is the
``dataset.built`` (or ``dataset.skipped``) whose request is that event; its run the
``training.completed`` of that dataset; its verdict the ``evaluation.completed`` of that run; it
reached service when a ``deployment.completed`` names the run's adapter. The next round samples
the model then in service.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flywheel_loop.schemas import (
    DatasetBuilt,
    DatasetSkipped,
    DeploymentCompleted,
    EvaluationCompleted,
    Event,
    SamplingCompleted,
    TrainingCompleted,
    TrainingStarted,
)

if TYPE_CHECKING:
    from rich.table import Table

__all__ = ["ROUND_EVENTS", "Round", "fold_rounds", "rounds_table"]

ROUND_EVENTS = ("sampling.completed", "dataset.built", "dataset.skipped", "training.started", "training.completed",
                "evaluation.completed", "deployment.completed")


@dataclass
class Round:
    """One round's figures, as far as it got."""

    role: str
    sampled_id: str
    model_version: str
    tasks: int
    samples: int
    k: int
    pass_at_1: float
    pass_at_k: float
    solved_tasks: int
    dataset: str | None = None
    rows_added: int | None = None
    pairs_added: int | None = None
    skipped: str | None = None
    run_id: str | None = None
    adapter: str | None = None
    verdict: str | None = None
    deployed: bool = False

    @property
    def stage(self) -> str:
        if self.deployed:
            return "deployed"
        if self.verdict is not None:
            return f"gate: {self.verdict}"
        if self.skipped is not None:
            return "no dataset"
        if self.run_id is not None:
            return "trained" if self.adapter else "training"
        return "dataset built" if self.dataset else "sampled"

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "stage": self.stage}


def fold_rounds(events: Iterable[tuple[int, Event[Any]]], role: str | None = None) -> list[Round]:
    """Every round on the log (of ``role``), in log order."""
    rounds: dict[str, Round] = {}
    by_dataset: dict[str, Round] = {}
    by_run: dict[str, Round] = {}
    by_adapter: dict[str, Round] = {}
    rft_before: dict[str, tuple[int, int]] = {}  # role -> (rft rows, rft pairs) of its last round's dataset
    for _, event in events:
        d = event.data
        if isinstance(d, SamplingCompleted):
            if role is None or d.role == role:
                rounds[event.id] = Round(d.role, event.id, d.model_version, d.tasks, d.samples, d.k, d.pass_at_1,
                                         d.pass_at_k, d.solved_tasks)
        elif isinstance(d, DatasetBuilt) and d.request_id in rounds:
            r = rounds[d.request_id]
            r.dataset = d.dataset_hash
            rows, pairs = d.sources.get("rft", 0), d.sources.get("dpo_rft", 0)
            before = rft_before.get(d.role, (0, 0))
            r.rows_added, r.pairs_added = rows - before[0], pairs - before[1]  # a dataset holds every round's rows
            rft_before[d.role] = (rows, pairs)
            by_dataset[d.dataset_hash] = r
        elif isinstance(d, DatasetSkipped) and d.request_id in rounds:
            rounds[d.request_id].skipped = f"{d.reason}: {d.detail}"
        elif isinstance(d, TrainingStarted) and d.dataset_hash in by_dataset:
            by_dataset[d.dataset_hash].run_id = d.run_id
        elif isinstance(d, TrainingCompleted) and d.dataset_hash in by_dataset:
            r = by_dataset[d.dataset_hash]
            r.run_id, r.adapter = d.run_id, d.adapter_hash
            by_run[d.run_id] = r
            by_adapter[d.adapter_hash] = r
        elif isinstance(d, EvaluationCompleted) and d.run_id in by_run:
            r = by_run[d.run_id]
            r.verdict = d.outcome  # the gate's word (inconclusive too); passed/failed for an event from before it
        elif isinstance(d, DeploymentCompleted) and d.adapter_hash in by_adapter:
            by_adapter[d.adapter_hash].deployed = True
    return list(rounds.values())


def rounds_table(found: list[Round]) -> Table:
    """The rounds as a table (``flywheel rounds``, ``flywheel runs``)."""
    from rich.table import Table

    t = Table("round", "role", "model sampled", "tasks", "samples", "pass@1", "pass@k", "rows added", "pairs",
              "dataset", "run", "stage", title="rounds of learning from verified attempts")
    for n, r in enumerate(found, 1):
        t.add_row(str(n), r.role, r.model_version, str(r.tasks), str(r.samples), f"{r.pass_at_1:.3f}",
                  f"{r.pass_at_k:.3f} (k={r.k})", "-" if r.rows_added is None else str(r.rows_added),
                  "-" if r.pairs_added is None else str(r.pairs_added), (r.dataset or "-")[:12], r.run_id or "-",
                  r.stage)
    return t
