"""The demo's coding tasks, shipped in ``tasks.toml`` beside this module.

Each task has an id, a prompt, a reference solution, unit tests (``def test_*()`` functions with
``assert``, run by ``plugins/sandbox.py``), a domain and a fixed split: ``train`` tasks are worked
and corrected before training, ``held_out`` tasks only measure the model before and after. Every
reference solution follows the project convention the corrections teach: its first line is
``LICENSE_HEADER``. The prompts never mention it, so a model can only learn it from corrections.

The file also holds ``[[question]]`` entries (an id and a prompt): short questions the agent is
asked between tasks, with no tests and no convention. Their answers are accepted as given, so the
model's own answers join the training data and remind it that not every answer is a file (without
them the adapter starts every answer with the header, and the gate sees it forget).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = ["LICENSE_HEADER", "LICENSE_ID", "TASKS_FILE", "Question", "Task", "TaskFileError", "load_questions",
           "load_tasks"]

#: the convention: the first line of every Python file
LICENSE_ID = "Apache-2.0"
LICENSE_HEADER = f"# SPDX-License-Identifier: {LICENSE_ID}"
TASKS_FILE = Path(__file__).with_name("tasks.toml")

Split = Literal["train", "held_out"]


class TaskFileError(ValueError):
    """The tasks file is missing a field, has a bad value or repeats an id; the message says where."""


@dataclass(frozen=True)
class Task:
    """One small coding task with its reference solution and tests."""

    id: str
    split: Split
    domain: str
    prompt: str
    solution: str
    tests: str


@dataclass(frozen=True)
class Question:
    """A short question with no tests: its answer is accepted as given."""

    id: str
    prompt: str


def _read(path: Path) -> dict[str, object]:
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise TaskFileError(f"cannot read the demo tasks {path}: {exc}") from exc


def load_questions(path: Path = TASKS_FILE) -> list[Question]:
    """Every ``[[question]]`` of ``path`` in file order (none is fine)."""
    entries = _read(path).get("question", [])
    if not isinstance(entries, list):
        raise TaskFileError(f"{path}: `question` must be an array of tables ([[question]])")
    questions: list[Question] = []
    for n, entry in enumerate(entries, 1):
        fields = {k: entry.get(k) if isinstance(entry, dict) else None for k in ("id", "prompt")}
        bad = [k for k, v in fields.items() if not isinstance(v, str) or not v.strip()]
        if bad:
            raise TaskFileError(f"{path}, question {n}: `{bad[0]}` must be a non-empty string")
        questions.append(Question(id=str(fields["id"]), prompt=str(fields["prompt"])))
    return questions


def load_tasks(path: Path = TASKS_FILE) -> list[Task]:
    """Every task of ``path`` in file order; ``TaskFileError`` naming the task and field on a bad entry."""
    entries = _read(path).get("task")
    if not isinstance(entries, list) or not entries:
        raise TaskFileError(f"{path}: no [[task]] entries")
    tasks: list[Task] = []
    seen: set[str] = set()
    for n, entry in enumerate(entries, 1):
        where = f"{path}, task {n}"
        fields = {}
        for name in ("id", "split", "domain", "prompt", "solution", "tests"):
            value = entry.get(name) if isinstance(entry, dict) else None
            if not isinstance(value, str) or not value.strip():
                raise TaskFileError(f"{where}: `{name}` must be a non-empty string")
            fields[name] = value
        if fields["split"] not in ("train", "held_out"):
            raise TaskFileError(f"{where} ({fields['id']}): split is train or held_out, got {fields['split']!r}")
        if fields["id"] in seen:
            raise TaskFileError(f"{where}: the id {fields['id']!r} is used twice")
        if fields["solution"].splitlines()[0].strip() != LICENSE_HEADER:
            raise TaskFileError(f"{where} ({fields['id']}): the solution must start with {LICENSE_HEADER!r}")
        seen.add(fields["id"])
        tasks.append(
            Task(
                id=fields["id"],
                split=fields["split"],  # type: ignore[arg-type]
                domain=fields["domain"],
                prompt=fields["prompt"],
                solution=fields["solution"],
                tests=fields["tests"],
            )
        )
    return tasks
