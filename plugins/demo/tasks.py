"""The demo's coding tasks, shipped in ``tasks.toml`` beside this module.

The tasks use the project's own helper API, the shop's: ``helpers`` in the tasks file defines
``money`` (a price in cents as the shop shows it), ``sku`` (a stock-keeping unit), ``vat`` (the shop's
tax) and the house result style ``ok`` / ``fail``. The project's code calls them without importing
them; every task's tests start with a prelude that defines them and installs them as builtins
(``helpers_prelude``), so the code under test finds them in the sandbox (``plugins/shared/sandbox.py``,
whose limits are unchanged) and so does every other reader of the tests (the gate). The prompts speak
of the house terms only ("in the shop price format", "a shop failure result"), never of the helpers:
a model cannot guess the format, and only the corrections show which helper is meant. Training tasks
use each helper many times; held-out tasks use them in combinations no training task has.

Each task has an id, a prompt, a reference solution, unit tests (``def test_*()`` functions with
``assert``, run by ``plugins/shared/sandbox.py``), a domain and a fixed split: ``train`` tasks are worked
and corrected before training, ``held_out`` tasks only measure the model before and after. Every
reference solution also follows the project convention the corrections teach: its first line is
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

__all__ = ["HELPER_NAMES", "LICENSE_HEADER", "LICENSE_ID", "TASKS_FILE", "Question", "Task", "TaskFileError",
           "helpers_prelude", "load_helpers", "load_questions", "load_tasks"]

#: the convention: the first line of every Python file
LICENSE_ID = "Apache-2.0"
LICENSE_HEADER = f"# SPDX-License-Identifier: {LICENSE_ID}"
TASKS_FILE = Path(__file__).with_name("tasks.toml")
#: the shop's helper API: what ``helpers`` in the tasks file must define (the tasks' tests install them)
HELPER_NAMES = ("money", "sku", "vat", "ok", "fail")

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


def load_helpers(path: Path = TASKS_FILE) -> str:
    """The source of the shop's helper API (``helpers`` in ``path``): it must compile and define ``HELPER_NAMES``."""
    source = _read(path).get("helpers")
    if not isinstance(source, str) or not source.strip():
        raise TaskFileError(f"{path}: `helpers` (the source of the shop's helper API) must be a non-empty string")
    namespace: dict[str, object] = {}
    try:
        exec(compile(source, f"{path}:helpers", "exec"), namespace)  # noqa: S102 - the project's own shipped file
    except Exception as exc:
        raise TaskFileError(f"{path}: `helpers` does not run: {type(exc).__name__}: {exc}") from exc
    missing = [n for n in HELPER_NAMES if not callable(namespace.get(n))]
    if missing:
        raise TaskFileError(f"{path}: `helpers` must define {', '.join(missing)}")
    return source


def helpers_prelude(source: str) -> str:
    """The lines put before every task's tests: the helpers defined and installed as builtins, so the code under
    test calls them without importing them, as the project's code does (the sandbox imports the code before it
    runs the tests, and a name the code does not define is looked up in builtins when the function runs)."""
    names = ", ".join(HELPER_NAMES)
    return (f"# the shop's helper API, available to the project's code without an import\n{source.strip()}\n\n"
            f"import builtins as _builtins\nfor _helper in ({names},):\n"
            "    setattr(_builtins, _helper.__name__, _helper)\n\n\n")


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
    raw = _read(path)
    entries = raw.get("task")
    prelude = helpers_prelude(load_helpers(path)) if "helpers" in raw else ""
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
                tests=prelude + fields["tests"],
            )
        )
    return tasks
