"""Reading curated datasets: the folder format every feature shares (the curation feature
writes it; training, evaluation and privacy read it), and the fold of dataset events.

A dataset lives in ``<state_dir>/datasets/<sha256>/``: per non-empty split
(``train``, ``validation``, ``forgetting``, ``dpo_train``, ``dpo_validation``) a ``<split>.jsonl``
and a ``<split>.parquet`` with the same rows, ``lineage.txt`` (the event ids the rows came from)
and ``manifest.json`` (role, log positions, sizes, balance, the recipe; its SHA-256 is the
dataset's hash).

The folder is also the object ``datasets/<sha256>`` on the bus (``engine/artifacts.py``):
``dataset_folder`` finds it in the local cache or fetches it, and ``verify_dataset`` checks a
fetched copy against its hash (the manifest's SHA-256, and the SHA-256 the manifest records for
every JSONL split and the lineage) before it is used.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from flywheel_loop.engine.artifacts import ArtifactCorrupt, NotFoundAnywhere, ThreadArtifacts, Verifier, find_folder
from flywheel_loop.engine.config import Settings
from flywheel_loop.schemas import DatasetBuilt, DatasetSuperseded, Event

__all__ = [
    "FORMAT",
    "SPLITS",
    "CurrentDataset",
    "DatasetCorrupt",
    "DatasetNotFound",
    "DatasetUnusable",
    "current_datasets",
    "dataset_folder",
    "dataset_root",
    "find_dataset",
    "read_lineage",
    "read_manifest",
    "read_split",
    "verify_dataset",
]

SPLITS = ("train", "validation", "forgetting", "dpo_train", "dpo_validation")
FORMAT = "flywheel-dataset/1"


class DatasetUnusable(LookupError):
    """A dataset that cannot be used here; the message says which and why."""


class DatasetNotFound(DatasetUnusable):
    """No dataset folder matches a hash (or prefix), here or on the bus."""


class DatasetCorrupt(DatasetUnusable):
    """The copy on the bus is not the dataset its hash names."""


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


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_dataset(digest: str) -> Verifier:
    """A check that a folder is dataset ``digest``: its manifest's SHA-256 is the hash, and every JSONL
    split and the lineage have the SHA-256 the manifest records."""

    def check(folder: Path) -> str | None:
        manifest = folder / "manifest.json"
        if not manifest.is_file():
            return "it has no manifest.json"
        body = manifest.read_bytes()
        got = hashlib.sha256(body).hexdigest()
        if got != digest:
            return f"its manifest's SHA-256 is {got[:16]}..., not {digest[:16]}..."
        m = orjson.loads(body)
        files = [(info["jsonl"], info["sha256"]) for info in m.get("splits", {}).values()]
        if m.get("lineage"):
            files.append((m["lineage"]["file"], m["lineage"]["sha256"]))
        for name, want in files:
            path = folder / name
            if not path.is_file():
                return f"{name} is missing"
            if _sha256_file(path) != want:
                return f"{name} does not have the SHA-256 its manifest records"
        return None

    return check


def dataset_folder(
    settings: Settings, digest: str, artifacts: ThreadArtifacts | None = None, hint: str | Path | None = None
) -> Path:
    """The folder of dataset ``digest``: in the local cache, else fetched from the bus and verified
    (``artifacts``), else ``hint`` (the path its ``dataset.built`` names) when this machine has it.
    ``DatasetNotFound`` / ``DatasetCorrupt`` say why there is none; a bus too slow to answer raises
    ``ArtifactError`` (worth another try)."""
    try:
        return find_folder("datasets", digest, settings.layout.dataset(digest), "manifest.json", artifacts,
                           verify_dataset(digest), hint)
    except ArtifactCorrupt as exc:
        raise DatasetCorrupt(f"dataset {digest} refused: {exc}") from None
    except NotFoundAnywhere as exc:
        raise DatasetNotFound(f"dataset {digest} not found (looked in {exc})") from None


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
