"""The general coding suite (``plugins/evaluation/data/coding_suite.jsonl``) and its loader.

Every reference solution passes its tests in the project's sandbox, and a stub that returns None
fails them (the tests are not vacuous); ids are unique; no problem repeats a demo training task;
the loader rejects a malformed line naming the line and the field; split and sample are
deterministic. The sandbox runs (two per problem) go through a pool of 2 threads: about 13 s on
2 quiet cores (25 s of CPU), 30 s while other work shares them.
"""

from __future__ import annotations

import itertools
import json
import re
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from flywheel_loop.plugins.evaluation.suite import (
    DATA,
    SuiteError,
    SuiteProblem,
    focused_sample,
    load_suite,
    parse_suite,
    sample,
    split_suite,
    task_rows,
)
from flywheel_loop.plugins.shared.sandbox import TestRun, run_tests

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def suite() -> list[SuiteProblem]:
    return load_suite()


def _stub(entry_point: str) -> str:
    return f"def {entry_point}(*args, **kwargs):\n    return None\n"


@pytest.fixture(scope="module")
def runs(suite: list[SuiteProblem]) -> dict[str, tuple[TestRun, TestRun]]:
    """(reference solution, stub) runs of every problem, two sandboxes at a time."""

    def both(p: SuiteProblem) -> tuple[TestRun, TestRun]:
        return run_tests(p.solution, p.test_code), run_tests(_stub(p.entry_point), p.test_code)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip((p.id for p in suite), pool.map(both, suite), strict=True))


def test_suite_size_and_ids(suite: list[SuiteProblem]) -> None:
    assert len(suite) >= 170
    ids = [p.id for p in suite]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"cs-\d{3}-[a-z0-9-]+", i) for i in ids), ids
    assert len({p.entry_point for p in suite}) == len(suite), "two problems ask for the same function"
    assert {p.difficulty for p in suite} <= {"easy", "medium"}
    assert sum(p.difficulty == "easy" for p in suite) > len(suite) / 2, "the suite should be mostly easy"


def test_the_file_is_one_canonical_json_object_a_line() -> None:
    lines = (DATA / "coding_suite.jsonl").read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        item = json.loads(line)
        assert list(item) == ["id", "prompt", "entry_point", "solution", "tests", "tags", "difficulty"], n
        asserts = item["tests"].count("assert ")
        assert 3 <= asserts <= 6, f"line {n}: {item['id']} has {asserts} asserts"


def test_every_reference_solution_passes(suite: list[SuiteProblem], runs: dict[str, tuple[TestRun, TestRun]]) -> None:
    bad = {pid: (r.errors, r.output[-300:]) for pid, (r, _) in runs.items() if not r.all_passed}
    assert not bad


def test_a_stub_returning_none_fails_every_problem(runs: dict[str, tuple[TestRun, TestRun]]) -> None:
    vacuous = [pid for pid, (_, stub) in runs.items() if stub.all_passed or stub.passed]
    assert not vacuous


def test_no_problem_repeats_a_demo_task(suite: list[SuiteProblem]) -> None:
    """The demo trains on its tasks: a suite problem asking for the same function would not
    measure forgetting."""
    tasks = tomllib.loads((ROOT / "plugins" / "demo" / "tasks.toml").read_text())["task"]
    demo = {re.search(r"`(\w+)\(", t["prompt"]).group(1) for t in tasks if "`" in t["prompt"]}  # type: ignore[union-attr]
    assert demo, "the demo's task names were not found"
    assert not demo & {p.entry_point for p in suite}


def test_no_two_prompts_are_near_duplicates(suite: list[SuiteProblem]) -> None:
    common = {
        "write", "a", "python", "function", "class", "generator", "that", "the", "returns", "return", "of", "and",
        "in", "to", "is", "or", "an", "for", "when", "it", "each", "with", "as", "by", "are", "be", "on", "from",
        "its", "every", "no", "not", "one", "at", "than", "only", "their", "s", "str", "int", "list", "dict",
        "bool", "float", "tuple", "none",
    }
    words = {p.id: set(re.findall(r"[a-z0-9_]+", p.prompt.lower())) - common for p in suite}
    worst = max(
        ((len(words[a.id] & words[b.id]) / len(words[a.id] | words[b.id]), a.id, b.id)
         for a, b in itertools.combinations(suite, 2)),
    )
    assert worst[0] < 0.6, worst


def test_test_code_is_one_test_of_every_assert(suite: list[SuiteProblem]) -> None:
    p = suite[0]
    assert p.test_code.startswith(f"def test_{p.entry_point}():\n")
    run = run_tests(p.solution, p.test_code)
    assert (run.passed, run.failed) == (1, 0)
    rows = task_rows(suite[:2], render=lambda s: f"<user>{s}")
    assert rows[0] == {"id": p.id, "prompt": f"<user>{p.prompt}", "tests": p.test_code, "text": p.prompt}


# --------------------------------------------------------------------------- the loader

GOOD: dict[str, object] = {
    "id": "t-1",
    "prompt": "Write a Python function `inc(x: int) -> int` that adds one.",
    "entry_point": "inc",
    "solution": "def inc(x: int) -> int:\n    return x + 1\n",
    "tests": "assert inc(1) == 2\n",
    "tags": ["math"],
    "difficulty": "easy",
}


def _lines(*items: dict[str, object] | str) -> str:
    return "\n".join(i if isinstance(i, str) else json.dumps(i) for i in items) + "\n"


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        ("{not json", r"bad\.jsonl:2: not valid JSON"),
        ({k: v for k, v in GOOD.items() if k != "tests"}, r"bad\.jsonl:2: field 'tests' is missing"),
        ({**GOOD, "id": "t-2", "tags": "math"}, r"bad\.jsonl:2: field 'tags' must be a non-empty list"),
        ({**GOOD, "id": "t-2", "difficulty": "trivial"}, r"bad\.jsonl:2: field 'difficulty'"),
        ({**GOOD, "id": "t-2", "solution": "def inc(x:\n"}, r"bad\.jsonl:2: field 'solution' is not valid Python"),
        ({**GOOD, "id": "t-2", "solution": "def other(x): return x\n"},
         r"bad\.jsonl:2: field 'solution' does not define 'inc'"),
        ({**GOOD, "id": "t-2", "tests": "inc(1)\n"}, r"bad\.jsonl:2: field 'tests' has no assert"),
        ({**GOOD, "id": "t-2", "prompt": "Add one."}, r"bad\.jsonl:2: field 'prompt' does not name"),
        ({**GOOD, "id": "t-2", "extra": 1}, r"bad\.jsonl:2: field 'extra' is not a problem field"),
        (GOOD, r"bad\.jsonl:2: field 'id': 't-1' is already used on line 1"),
    ],
)
def test_the_loader_names_the_line_and_field_of_a_malformed_problem(
    tmp_path: Path, broken: dict[str, object] | str, message: str
) -> None:
    (tmp_path / "bad.jsonl").write_text(_lines(GOOD, broken))
    with pytest.raises(SuiteError, match=message):
        load_suite("bad", folder=tmp_path)


def test_the_loader_reads_a_good_file_and_refuses_unknown_suites(tmp_path: Path) -> None:
    (tmp_path / "mini.jsonl").write_text(_lines(GOOD, "", {**GOOD, "id": "t-2"}))
    problems = load_suite("mini", folder=tmp_path)
    assert [p.id for p in problems] == ["t-1", "t-2"]
    assert problems[0].tags == ("math",) and problems[0].as_dict() == GOOD
    with pytest.raises(SuiteError, match="no suite 'nope'.*mini"):
        load_suite("nope", folder=tmp_path)
    with pytest.raises(SuiteError, match="suite name"):
        load_suite("../etc/passwd")
    with pytest.raises(SuiteError, match="no problems"):
        parse_suite("\n\n")


# --------------------------------------------------------------------------- split and sample


def test_split_is_seeded_disjoint_complete_and_stable(suite: list[SuiteProblem]) -> None:
    train, held = split_suite(suite, seed=7, fraction=0.5)
    assert (train, held) == split_suite(suite, seed=7, fraction=0.5)
    assert not {p.id for p in train} & {p.id for p in held}
    assert sorted(p.id for p in train + held) == sorted(p.id for p in suite)
    assert [p for p in suite if p in held] == held, "the held-out part keeps the suite's order"
    assert 0.35 < len(held) / len(suite) < 0.65
    assert split_suite(suite, seed=8, fraction=0.5)[1] != held, "another seed gives another split"
    # a problem's side does not depend on the other problems
    assert split_suite(suite[::2], seed=7, fraction=0.5)[1] == [p for p in held if p in suite[::2]]
    assert split_suite(suite, seed=7, fraction=0.0) == (list(suite), [])
    assert split_suite(suite, seed=7, fraction=1.0) == ([], list(suite))
    with pytest.raises(ValueError):
        split_suite(suite, seed=7, fraction=1.5)


def test_sample_is_seeded_and_grows_by_adding(suite: list[SuiteProblem]) -> None:
    _, held = split_suite(suite, seed=3, fraction=0.5)
    picked = sample(held, 20, seed=1)
    assert picked == sample(held, 20, seed=1)
    assert len(picked) == 20 and len({p.id for p in picked}) == 20
    assert {p.id for p in picked} <= {p.id for p in held}
    assert picked != sample(held, 20, seed=2)
    assert {p.id for p in picked} <= {p.id for p in sample(held, 30, seed=1)}
    assert sample(held, 10_000, seed=1) == held
    assert sample(held, 0, seed=1) == []
    with pytest.raises(ValueError):
        sample(held, -1, seed=1)


def test_a_focused_sample_draws_the_known_solved_problems_first(suite: list[SuiteProblem]) -> None:
    known = [p.id for p in sample(suite, 5, seed=11)]
    picked = focused_sample(suite, 8, seed=1, solved=[*known, "no-such-problem"])
    assert len(picked) == 8 and {p.id for p in picked} >= set(known)  # every known one, then 3 of the rest
    assert picked == focused_sample(suite, 8, seed=1, solved=known)
    assert [p.id for p in picked] == [p.id for p in suite if p in picked]  # the suite's order
    many = [p.id for p in sample(suite, 20, seed=11)]
    drawn = {p.id for p in focused_sample(suite, 8, seed=1, solved=many)}
    assert drawn <= set(many) and len(drawn) == 8  # enough known: none of the rest
    assert focused_sample(suite, 8, seed=1, solved=[]) == sample(suite, 8, seed=1)  # nothing known: a plain sample
