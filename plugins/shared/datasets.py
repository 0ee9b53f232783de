"""Reading curated datasets: the folder format every feature shares (the curation feature
writes it; training, evaluation and privacy read it), and the fold of dataset events.

A dataset lives in ``<state_dir>/datasets/<sha256>/``: per non-empty split
(``train``, ``validation``, ``forgetting``, ``dpo_train``, ``dpo_validation``) a ``<split>.jsonl``
and a ``<split>.parquet`` with the same rows, ``lineage.txt`` (the event ids the rows came from)
and ``manifest.json`` (role, log positions, sizes, balance, the recipe; its SHA-256 is the
dataset's hash).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from flywheel_loop.engine.config import Settings
from flywheel_loop.schemas import DatasetBuilt, DatasetSuperseded, Event

__all__ = [
    "FORMAT",
    "SPLITS",
    "CurrentDataset",
    "DatasetNotFound",
    "current_datasets",
    "dataset_root",
    "find_dataset",
    "read_lineage",
    "read_manifest",
    "read_split",
]

SPLITS = ("train", "validation", "forgetting", "dpo_train", "dpo_validation")
FORMAT = "flywheel-dataset/1"


class DatasetNotFound(LookupError):
    """No dataset folder matches a hash (or prefix)."""


def dataset_root(settings: Settings) -> Path:
    return settings.layout.datasets


def read_split(folder: Path, split: str) -> list[dict[str, Any]]:
    """The rows of one split of a dataset folder ([] when the split is empty, so not written)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: one of {', '.join(SPLITS)}")
    path = folder / f"{split}.jsonl"
    if not path.is_file():
        return []
    with open(path, "rb") as fh:
        return [orjson.loads(line) for line in fh if line.strip()]


def read_manifest(folder: Path) -> dict[str, Any]:
    return dict(orjson.loads((folder / "manifest.json").read_bytes()))


def read_lineage(folder: Path) -> list[str] | None:
    """Every event id a dataset came from (its ``lineage.txt``), or None without a folder."""
    try:
        return (folder / "lineage.txt").read_text().split()
    except FileNotFoundError:
        return None


def find_dataset(settings: Settings, hash_prefix: str) -> Path:
    """The folder of the dataset whose hash starts with ``hash_prefix`` (unique)."""
    root = dataset_root(settings)
    prefix = hash_prefix.strip().lower()
    matches = sorted(p for p in root.glob(f"{prefix}*") if (p / "manifest.json").is_file()) if prefix else []
    if not matches:
        raise DatasetNotFound(f"no dataset {hash_prefix!r} under {root} (flywheel datasets lists them)")
    if len(matches) > 1:
        names = ", ".join(p.name[:16] for p in matches[:5])
        raise DatasetNotFound(f"{hash_prefix!r} matches {len(matches)} datasets ({names}...): give more of the hash")
    return matches[0]




@dataclass(frozen=True)
class CurrentDataset:
    """A dataset that is not superseded, as the log describes it."""

    digest: str
    role: str
    log_position: int
    lineage: tuple[str, ...]
    lineage_complete: bool


def current_datasets(events: Iterable[tuple[int, Event[Any]]]) -> dict[str, CurrentDataset]:
    """hash -> the datasets ``dataset.built`` and ``dataset.superseded`` events leave current."""
    current: dict[str, CurrentDataset] = {}
    for _, event in events:
        d = event.data
        if isinstance(d, DatasetBuilt):
            complete = d.lineage_total <= len(d.lineage)
            current[d.dataset_hash] = CurrentDataset(d.dataset_hash, d.role, d.log_position, tuple(d.lineage), complete)
        elif isinstance(d, DatasetSuperseded):
            current.pop(d.old_hash, None)
            if d.new_hash:
                complete = d.lineage_total <= len(d.lineage)
                current[d.new_hash] = CurrentDataset(d.new_hash, d.role, d.log_position, tuple(d.lineage), complete)
    return current
