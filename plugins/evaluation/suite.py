"""Coding suites: Python problems with unit tests, shipped with Flywheel, that measure by running
code what a model can do (pass@1) and what a candidate forgot (problems the model in service
solved that the candidate no longer solves).

A suite is a JSON-lines file ``plugins/evaluation/data/<name>.jsonl``, one problem a line::

    {"id": "cs-001-count-uppercase", "prompt": "Write a Python function `count_uppercase(s: str) -> int` ...",
     "entry_point": "count_uppercase", "solution": "def count_uppercase(s: str) -> int: ...",
     "tests": "assert count_uppercase(\\"Hi\\") == 1\\n...", "tags": ["strings"], "difficulty": "easy"}

- ``prompt`` is what a user would ask a coding assistant; it names the function (or class) and
  its signature exactly.
- ``tests`` are plain ``assert`` statements (with any set-up they need) that call the entry point;
  they run after the answer's code, standard library only. ``SuiteProblem.test_code`` wraps them
  in one ``def test_<entry point>()`` so that ``plugins/sandbox.py`` ``run_tests(code,
  problem.test_code)`` runs them as one test (all asserts must pass).
- ``solution`` is a reference solution that passes the tests (checked by
  ``tests/test_coding_suite.py``, as is that a stub returning None fails them).

``load_suite`` reads and validates a suite (an error names the file, the line and the field);
``split_suite`` and ``sample`` choose problems deterministically from a seed and each problem's id,
so the same seed gives the same problems on every machine, and a problem's side of a split does
not change when other problems are added or removed.

``coding_suite`` (the default) holds general Python problems written for Flywheel (Apache-2.0,
like the project; none taken from a benchmark): strings, lists, dictionaries, numbers, sorting
and searching, recursion, small classes, parsing, dates, bits, small algorithms and generators,
mostly easy so that a 135M-parameter model solves a measurable share: SmolLM2-135M-Instruct, greedy
with 256 new tokens in its chat template, solves 36 of the 258 problems (14 %, 95 % interval
10-19 %; 35 of 199 easy, 1 of 59 medium), measured by ``ops/bench/suite_calibrate.py``.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import textwrap
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DATA",
    "DIFFICULTIES",
    "SuiteError",
    "SuiteProblem",
    "focused_sample",
    "load_suite",
    "open_suite",
    "parse_suite",
    "sample",
    "split_suite",
    "task_rows",
]

#: where the shipped suites live
DATA = Path(__file__).parent / "data"
#: the difficulty levels a problem may have
DIFFICULTIES = ("easy", "medium", "hard")

_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_FIELDS = ("id", "prompt", "entry_point", "solution", "tests", "tags", "difficulty")


class SuiteError(ValueError):
    """A suite that cannot be used: missing, or a line that is not a valid problem."""


@dataclass(frozen=True)
class SuiteProblem:
    """One problem: the request, the name it asks for, a reference solution and its tests."""

    id: str
    prompt: str
    entry_point: str
    solution: str
    tests: str
    tags: tuple[str, ...]
    difficulty: str

    @property
    def test_code(self) -> str:
        """The tests as one test function, the form ``plugins.sandbox.run_tests`` runs: it
        passes when every assert passes."""
        return f"def test_{self.entry_point}():\n" + textwrap.indent(self.tests.strip("\n"), "    ") + "\n"

    def as_dict(self) -> dict[str, Any]:
        """The problem as its JSON line holds it (``tags`` as a list)."""
        return {
            "id": self.id,
            "prompt": self.prompt,
            "entry_point": self.entry_point,
            "solution": self.solution,
            "tests": self.tests,
            "tags": list(self.tags),
            "difficulty": self.difficulty,
        }


def load_suite(name: str = "coding_suite", folder: Path | None = None) -> list[SuiteProblem]:
    """The problems of suite ``name`` (``<folder>/<name>.jsonl``; by default the suites shipped
    in ``plugins/evaluation/data``), in file order, every line validated."""
    if not _NAME.fullmatch(name):
        raise SuiteError(f"suite name {name!r}: use lowercase letters, digits, '_' and '-'")
    path = (folder or DATA) / f"{name}.jsonl"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        known = sorted(p.stem for p in (folder or DATA).glob("*.jsonl"))
        there = ", ".join(known) or "none"
        raise SuiteError(f"no suite {name!r}: {path} does not exist (suites there: {there})") from None
    return parse_suite(text, source=str(path))


def open_suite(spec: str) -> list[SuiteProblem]:
    """A shipped suite by name (``coding_suite``), or a suite file of your own by its path
    (``*.jsonl``, in the same format)."""
    if spec.endswith(".jsonl") or "/" in spec:
        path = Path(spec).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise SuiteError(f"suite file {path}: {exc.strerror or exc}") from None
        return parse_suite(text, source=str(path))
    return load_suite(spec)


def parse_suite(text: str, source: str = "<suite>") -> list[SuiteProblem]:
    """Problems from JSON-lines ``text``; blank lines are skipped. Raises ``SuiteError`` naming
    ``source``, the line number and the field for the first invalid line, or for an id used twice."""
    problems: list[SuiteProblem] = []
    first_line: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        problem = _parse_line(line, f"{source}:{number}")
        if problem.id in first_line:
            first = first_line[problem.id]
            raise SuiteError(f"{source}:{number}: field 'id': {problem.id!r} is already used on line {first}")
        first_line[problem.id] = number
        problems.append(problem)
    if not problems:
        raise SuiteError(f"{source}: the suite has no problems")
    return problems


def _parse_line(line: str, where: str) -> SuiteProblem:
    try:
        item = json.loads(line)
    except ValueError as exc:
        raise SuiteError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(item, dict):
        raise SuiteError(f"{where}: expected a JSON object, got {type(item).__name__}")
    for field in _FIELDS:
        if field not in item:
            raise SuiteError(f"{where}: field {field!r} is missing")
    unknown = sorted(set(item) - set(_FIELDS))
    if unknown:
        raise SuiteError(f"{where}: field {unknown[0]!r} is not a problem field (expected {', '.join(_FIELDS)})")

    def text(field: str) -> str:
        value = item[field]
        if not isinstance(value, str) or not value.strip():
            raise SuiteError(f"{where}: field {field!r} must be a non-empty string")
        return value

    pid, prompt, entry, solution, tests, difficulty = (
        text(f) for f in ("id", "prompt", "entry_point", "solution", "tests", "difficulty")
    )
    if not _ID.fullmatch(pid):
        raise SuiteError(f"{where}: field 'id': {pid!r} may only hold letters, digits, '_', '.' and '-'")
    if not entry.isidentifier():
        raise SuiteError(f"{where}: field 'entry_point': {entry!r} is not a Python identifier")
    if f"`{entry}" not in prompt:
        raise SuiteError(f"{where}: field 'prompt' does not name the entry point as `{entry}...`")
    if difficulty not in DIFFICULTIES:
        raise SuiteError(f"{where}: field 'difficulty': {difficulty!r} is not one of {', '.join(DIFFICULTIES)}")
    tags = item["tags"]
    if not isinstance(tags, list) or not tags or not all(isinstance(t, str) and t.strip() for t in tags):
        raise SuiteError(f"{where}: field 'tags' must be a non-empty list of non-empty strings")
    try:
        module = ast.parse(solution)
    except SyntaxError as exc:
        raise SuiteError(f"{where}: field 'solution' is not valid Python ({exc.msg}, line {exc.lineno})") from None
    defined = {n.name for n in module.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)}
    if entry not in defined:
        raise SuiteError(f"{where}: field 'solution' does not define {entry!r} at the top level")
    try:
        checks = ast.parse(tests)
    except SyntaxError as exc:
        raise SuiteError(f"{where}: field 'tests' is not valid Python ({exc.msg}, line {exc.lineno})") from None
    if not any(isinstance(n, ast.Assert) for n in ast.walk(checks)):
        raise SuiteError(f"{where}: field 'tests' has no assert statement")
    if not any(isinstance(n, ast.Name) and n.id == entry for n in ast.walk(checks)):
        raise SuiteError(f"{where}: field 'tests' never uses {entry!r}")
    return SuiteProblem(pid, prompt, entry, solution, tests, tuple(tags), difficulty)


def _rank(salt: str, seed: int, problem_id: str) -> int:
    """A 64-bit number drawn from (salt, seed, id) alone: stable across runs and machines."""
    digest = hashlib.sha256(f"{salt}:{seed}:{problem_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def split_suite(
    problems: Sequence[SuiteProblem], seed: int, fraction: float
) -> tuple[list[SuiteProblem], list[SuiteProblem]]:
    """(train, held out): a problem is held out when the hash of (seed, its id) falls in the first
    ``fraction`` of the hash range, so about ``fraction`` of the problems are held out, the two
    parts are disjoint and cover the suite, both keep the suite's order, and a problem's side
    depends only on the seed and its id (not on which other problems the suite holds)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be between 0 and 1, not {fraction}")
    cut = fraction * 2**64
    train: list[SuiteProblem] = []
    held_out: list[SuiteProblem] = []
    for problem in problems:
        (held_out if _rank("split", seed, problem.id) < cut else train).append(problem)
    return train, held_out


def sample(problems: Sequence[SuiteProblem], n: int, seed: int) -> list[SuiteProblem]:
    """``n`` problems (all of them when there are fewer), chosen by the hash of (seed, id) and
    returned in the suite's order: the same seed gives the same sample, and growing ``n`` only
    adds problems."""
    if n < 0:
        raise ValueError(f"n must not be negative, not {n}")
    chosen = {p.id for p in sorted(problems, key=lambda p: (_rank("sample", seed, p.id), p.id))[:n]}
    return [p for p in problems if p.id in chosen]


def task_rows(problems: Iterable[SuiteProblem], render: Callable[[str], str] = str) -> list[dict[str, Any]]:
    """Rows in the form ``plugins.evaluation.metrics.task_pass_rate`` measures: ``prompt``
    (passed through ``render``, e.g. the model's chat template), ``tests`` (``test_code``), ``id`` and ``text``
    (the prompt as written, which a router reads)."""
    return [{"id": p.id, "prompt": render(p.prompt), "tests": p.test_code, "text": p.prompt} for p in problems]


def focused_sample(
    problems: Sequence[SuiteProblem], n: int, seed: int, solved: Iterable[str]
) -> list[SuiteProblem]:
    """``n`` problems drawn first from those in ``solved`` (the ids the model in service is known to solve),
    then, when fewer are known, from the rest; each part by ``sample``'s seeded draw, the result in the
    suite's order. Forgetting is the share of the problems the model in service solves that the candidate no
    longer solves: a problem it cannot solve shows nothing, so a sample of known-solved problems measures
    forgetting on every problem run, where a plain sample (a model solving 14 % of the suite) on a few."""
    known = set(solved)
    first = sample([p for p in problems if p.id in known], n, seed)
    rest = sample([p for p in problems if p.id not in known], n - len(first), seed)
    chosen = {p.id for p in first + rest}
    return [p for p in problems if p.id in chosen]
