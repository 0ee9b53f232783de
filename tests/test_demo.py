"""The end-to-end demo: its tasks, its convention, and (slow) the whole loop with the real model.

The slow test runs ``flywheel demo``'s driver with the real SmolLM2 base model (about 15 minutes
on 2 cores; ``bash ops/test --slow tests/test_demo.py``) and checks that every before/after figure
it reports is backed by events on the log: it reopens the run's log and recomputes each figure
from the events the summary names.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from flywheel_loop.engine.assessment import Evidence
from flywheel_loop.engine.config import load_settings
from flywheel_loop.engine.connection import open_bus
from flywheel_loop.plugins.demo.figures import CONVENTION_SCORE, read_since
from flywheel_loop.plugins.demo.tasks import (
    HELPER_NAMES,
    LICENSE_HEADER,
    LICENSE_ID,
    TaskFileError,
    load_helpers,
    load_questions,
    load_tasks,
)
from flywheel_loop.plugins.scoring.convention import assess
from flywheel_loop.plugins.shared.code import extract_code, follows_convention
from flywheel_loop.plugins.shared.sandbox import run_tests
from flywheel_loop.schemas import InteractionAnonymized, InteractionRecorded


def test_every_reference_solution_passes_its_tests_and_follows_the_convention() -> None:
    tasks = load_tasks()
    assert len(tasks) >= 40
    assert {t.split for t in tasks} == {"train", "held_out"}
    assert len({t.prompt for t in tasks}) == len(tasks)
    for n, task in enumerate(tasks):
        run = run_tests(task.solution, task.tests)
        assert run.all_passed, (task.id, run.errors)
        assert follows_convention(task.solution, LICENSE_ID), task.id
        if n % 4 == 0:  # and the tests can fail: an answer that returns nothing does not pass (a sample: time)
            stub = f"{LICENSE_HEADER}\ndef {task.id}(*args, **kwargs):\n    return None\n"
            assert not run_tests(stub, task.tests).all_passed, task.id


def _helpers_called(source: str) -> set[str]:
    import ast

    return {n.func.id for n in ast.walk(ast.parse(source))
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in HELPER_NAMES}


def _shape(source: str) -> str:
    """A solution's function as a syntax tree with its name, arguments and variables renamed in the order they
    appear (the helpers and builtins keep theirs): two functions that differ only in names have one shape."""
    import ast
    import builtins

    function = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef))
    names: dict[str, str] = {}
    keep = set(HELPER_NAMES) | set(dir(builtins))
    for node in ast.walk(function):
        if isinstance(node, ast.arg):
            node.arg = names.setdefault(node.arg, f"v{len(names)}")
        elif isinstance(node, ast.Name) and node.id not in keep:
            node.id = names.setdefault(node.id, f"v{len(names)}")
    function.name = "f"
    return ast.dump(function)


def test_a_renamed_copy_has_the_same_shape_and_another_combination_does_not() -> None:
    one = f"{LICENSE_HEADER}\ndef tax_label(cents):\n    return money(vat(cents))\n"
    renamed = f"{LICENSE_HEADER}\ndef vat_text(price):\n    return money(vat(price))\n"
    other = f"{LICENSE_HEADER}\ndef gross(cents):\n    return money(cents + vat(cents))\n"
    assert _shape(one) == _shape(renamed) and _shape(one) != _shape(other)


def test_the_tasks_teach_the_shop_helpers_and_the_held_out_tasks_combine_them_anew() -> None:
    tasks = load_tasks()
    train = [t for t in tasks if t.split == "train"]
    held_out = [t for t in tasks if t.split == "held_out"]
    taught = {name: sum(name in _helpers_called(t.solution) for t in train) for name in HELPER_NAMES}
    assert min(taught.values()) >= 5, taught  # each helper is corrected into many training answers
    bodies = {_shape(t.solution) for t in train}
    for task in held_out:
        assert _helpers_called(task.solution), task.id
        assert _shape(task.solution) not in bodies, task.id  # a new combination, not a renamed one
    for task in tasks:  # the prompts speak of the house terms, never of the helpers' names
        assert not any(re.search(rf"\b{name}\(", task.prompt) for name in HELPER_NAMES), task.id


def test_the_tests_pass_only_with_the_shop_helpers_behaviour() -> None:
    tasks = {t.id: t for t in load_tasks()}
    header = LICENSE_HEADER + "\n"
    # what a model that does not know the helpers writes: a guess at the format fails the tests
    guess = header + 'def price_label(cents):\n    return f"${cents / 100:.2f}"\n'
    assert not run_tests(guess, tasks["price_label"].tests).all_passed
    # a helper of its own shadows the shop's: the tests check the shop's behaviour, not the name
    own = header + 'def money(cents):\n    return str(cents)\n\ndef price_label(cents):\n    return money(cents)\n'
    assert not run_tests(own, tasks["price_label"].tests).all_passed
    # code that reproduces the helpers' behaviour passes as well as code that calls them
    inline = header + 'def price_label(cents):\n    return f"EUR {cents // 100}.{cents % 100:02d}"\n'
    assert run_tests(inline, tasks["price_label"].tests).all_passed
    assert "EUR" in load_helpers() and all(f"def {name}(" in load_helpers() for name in HELPER_NAMES)


@pytest.mark.parametrize(("text", "load", "message"), [
    ('[[task]]\nid = "x"\nsplit = "train"\ndomain = "math"\nprompt = "p"\ntests = "t"\n', load_tasks,
     "task 1: `solution`"),
    ('[[task]]\nid = "x"\nsplit = "later"\ndomain = "m"\nprompt = "p"\nsolution = "s"\ntests = "t"\n', load_tasks,
     "split is train or held_out"),
    ('[[task]]\nid = "x"\nsplit = "train"\ndomain = "m"\nprompt = "p"\nsolution = "def x(): pass"\n'
     'tests = "t"\n', load_tasks, "must start with"),
    ('helpers = "def money(cents):\\n    return cents"\n', load_helpers, "must define sku, vat, ok, fail"),
    ('helpers = "def money(:"\n', load_helpers, "`helpers` does not run: SyntaxError"),
])
def test_a_bad_tasks_file_names_the_task_and_the_field(
    tmp_path: Path, text: str, load: Callable[[Path], object], message: str
) -> None:
    path = tmp_path / "tasks.toml"
    path.write_text(text)
    with pytest.raises(TaskFileError, match=message):
        load(path)


def test_the_questions_load_and_a_bad_one_is_named(tmp_path: Path) -> None:
    questions = load_questions()
    assert questions and len({q.prompt for q in questions}) == len(questions)
    assert not {q.prompt for q in questions} & {t.prompt for t in load_tasks()}
    path = tmp_path / "tasks.toml"
    path.write_text('[[question]]\nid = "q"\nprompt = ""\n')
    with pytest.raises(TaskFileError, match="question 1: `prompt`"):
        load_questions(path)


def _interaction(output: str, language: str | None = "python") -> InteractionAnonymized:
    rec = InteractionRecorded(session_id="s", role="coder", model_id="m", input="write add", output=output,
                              context={"language": language} if language else {})
    return InteractionAnonymized(interaction_id="01J0000000000000000000000A", interaction=rec)


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        (f"{LICENSE_HEADER}\ndef add(a, b):\n    return a + b\n", 1.0),
        (f"Here it is:\n```python\n\n{LICENSE_HEADER}\ndef add(a, b):\n    return a + b\n```\n", 1.0),
        ("# SPDX-License-Identifier: MIT\ndef add(a, b):\n    return a + b\n", 1.0),
        ("```python\ndef add(a, b):\n    return a + b\n```", 0.0),
        (f"def add(a, b):\n    {LICENSE_HEADER}\n    return a + b\n", 0.0),
        ("", 0.0),
    ],
)
def test_the_convention_assessor_scores_the_header_of_the_code(output: str, expected: float) -> None:
    interaction = _interaction(output)
    result = assess(Evidence(interaction.interaction_id, interaction))
    assert result is not None
    assert result.scores == {"header": expected}


def test_the_convention_assessor_leaves_non_python_interactions_alone() -> None:
    interaction = _interaction("SELECT 1;", language="sql")
    assert assess(Evidence(interaction.interaction_id, interaction)) is None
    assert follows_convention(extract_code("```python\n# SPDX-License-Identifier: Apache-2.0\nx = 1\n```"), LICENSE_ID)
    assert not follows_convention("# SPDX-License-Identifier: MIT\nx = 1\n", LICENSE_ID)


async def test_phase_figures_are_the_latest_outcome_and_score_of_each_interaction_on_the_log(bus: Any) -> None:
    from flywheel_loop.plugins.demo.figures import phase_figures
    from flywheel_loop.schemas import OutcomeAnonymized, OutcomeObserved, QualityAssessed, new_event, new_id

    ids = [new_id() for _ in range(3)]

    def outcome(iid: str, passed: int, failed: int) -> Any:
        return new_event(OutcomeAnonymized(outcome_id=new_id(), outcome=OutcomeObserved(
            interaction_id=iid, compiles=True, tests_passed=passed, tests_failed=failed)), source="test")

    def score(iid: str, header: float) -> Any:
        return new_event(QualityAssessed(interaction_id=iid, role="coder", model_id="coder-base",
                                         scores={CONVENTION_SCORE: header, "outcome_reward.tests": 1.0},
                                         reward=0.5, confidence=1.0), source="test")

    events = [
        outcome(ids[0], 0, 2), outcome(ids[0], 2, 0),  # the later outcome is the one that counts
        outcome(ids[1], 1, 1),
        score(ids[0], 0.0), score(ids[0], 1.0), score(ids[1], 0.0),
        outcome(new_id(), 2, 0), score(new_id(), 1.0),  # another phase's interaction
    ]
    await bus.publish_many(events)
    figures = await phase_figures(bus, "before", ids)
    assert (figures.tasks, figures.passed, figures.following) == (3, 1, 1)
    assert figures.missing == [ids[2]]  # neither an outcome nor a score: not measured, not counted as passed
    assert figures.outcome_ids == [events[1].id, events[2].id]
    assert figures.score_ids == [events[4].id, events[5].id]
    assert figures.model_ids == ["coder-base"]


def test_the_json_figures_and_the_verdict_read_from_either_shape_of_the_gate(tmp_path: Path) -> None:
    import json

    from flywheel_loop.plugins.demo.figures import PhaseFigures
    from flywheel_loop.plugins.demo.run import DemoSummary

    summary = DemoSummary(state_dir=tmp_path)
    assert summary.verdict is None and summary.as_dict()["held_out_pass_rate"]["gain"] is None
    summary.before = PhaseFigures("before", ["coder-base"], tasks=12, passed=3, following=0)
    summary.after = PhaseFigures("after", ["coder-abc"], tasks=12, passed=9, following=12)
    summary.evaluation = {"passed": False, "reasons": ["failed: task pass rate"]}  # passed/refused only
    assert summary.verdict == "refused"
    summary.evaluation = {"passed": False, "verdict": "inconclusive", "reasons": []}  # a gate with a verdict
    figures = json.loads(json.dumps(summary.as_dict()))
    assert figures["verdict"] == "inconclusive"
    assert figures["held_out_pass_rate"] == {"before": 0.25, "after": 0.75, "gain": 0.5, "headroom": 0.75}
    assert figures["convention_adherence"] == {"before": 0.0, "after": 1.0}
    assert figures["phases"]["after"]["model_ids"] == ["coder-abc"]


def _recount(events: list[tuple[int, Any]], ids: list[str], kind: str) -> dict[str, Any]:
    by_id = {event.id: event for _, event in events}
    assert all(i in by_id for i in ids), f"{kind}: ids in the summary that are not on the log"
    return {i: by_id[i] for i in ids}


@pytest.mark.slow
@pytest.mark.timeout(3600)
async def test_the_demo_turns_the_flywheel_the_same_way_twice_and_its_figures_come_from_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The demo twice in a row, each in its own state folder and server: the same splits, the same dataset,
    the same training and the same verdict; and every figure of the first run recomputed from its log."""
    from flywheel_loop.plugins.demo.run import BASE_MODEL_NAME, demo_settings, run_demo

    monkeypatch.chdir(tmp_path)  # no stray flywheel.toml is read
    settings = load_settings(state_dir=tmp_path / "state")
    out = io.StringIO()
    run_dir = tmp_path / "run"
    summary = await run_demo(settings, Console(file=out, width=160), state_dir=run_dir)
    printed = out.getvalue()
    again = await run_demo(settings, Console(file=io.StringIO(), width=160), state_dir=tmp_path / "again")
    first, second = summary.as_dict(), again.as_dict()
    print("demo figures:", {k: first[k] for k in ("held_out_pass_rate", "convention_adherence", "verdict",
                                                  "timings_s")})
    print("again:", {k: second[k] for k in ("held_out_pass_rate", "convention_adherence", "verdict", "timings_s")})
    assert summary.dataset["splits"]["train"] and summary.dataset["splits"]["validation"]
    assert again.dataset["splits"] == summary.dataset["splits"]
    assert again.dataset["hash"] == summary.dataset["hash"]
    assert again.verdict == summary.verdict
    assert again.training["adapter_hash"] == summary.training["adapter_hash"]  # deterministic training
    assert first["held_out_pass_rate"] == second["held_out_pass_rate"]

    assert summary.before is not None and summary.work is not None
    assert summary.before.tasks == len([t for t in load_tasks() if t.split == "held_out"])
    assert not summary.before.missing and not summary.work.missing
    assert summary.evaluation, "the evaluator's verdict never arrived"
    assert "held-out tasks before and after" in printed

    # Reopen the run's log (its embedded server is stopped) and recompute every figure from it.
    async with open_bus(demo_settings(settings, run_dir)) as bus:
        events = await read_since(bus, 0, ("outcome.anonymized", "quality.assessed", "evaluation.completed",
                                           "deployment.completed", "deployment.failed", "training.completed"))
    phases = [summary.before, summary.work] + ([summary.after] if summary.after else [])
    for figures in phases:
        outcomes = _recount(events, figures.outcome_ids, "outcomes")
        scores = _recount(events, figures.score_ids, "scores")
        assert len(outcomes) == len(scores) == figures.tasks
        passed = sum(1 for e in outcomes.values()
                     if e.data.outcome.compiles and e.data.outcome.tests_passed and not e.data.outcome.tests_failed)
        following = sum(1 for e in scores.values() if e.data.scores.get(CONVENTION_SCORE) == 1.0)
        assert (passed, following) == (figures.passed, figures.following), figures.phase
        if figures.phase in ("before", "after"):  # the before/after table prints exactly these
            assert f"{figures.pass_rate:.0%} ({figures.passed}/{figures.tasks})" in printed
            assert f"{figures.convention_rate:.0%} ({figures.following}/{figures.tasks})" in printed
    assert summary.before.model_ids == [BASE_MODEL_NAME]
    assert summary.work.model_ids == [BASE_MODEL_NAME]
    # the base model has never seen the convention; the corrections are what could teach it
    assert summary.before.following == 0

    evaluation = _recount(events, [summary.evaluation["id"]], "evaluation")[summary.evaluation["id"]]
    assert evaluation.type == "evaluation.completed"
    assert evaluation.data.passed == summary.evaluation["passed"]
    assert dict(evaluation.data.candidate) == summary.evaluation["candidate"]
    assert evaluation.data.adapter_hash == summary.training["adapter_hash"]
    deployment = _recount(events, [summary.deployment["id"]], "deployment")[summary.deployment["id"]]
    assert deployment.data.evaluation_id == evaluation.id
    if deployment.type == "deployment.completed":  # passed, or inconclusive and deployed as a canary
        assert evaluation.data.passed or evaluation.data.verdict == "inconclusive"
        assert summary.after is not None and summary.after.model_ids == [deployment.data.model_name]
        assert summary.after.tasks == summary.before.tasks
        if not evaluation.data.passed:
            assert deployment.data.traffic_share < 1 and "deployed as a canary" in printed
    else:
        assert not evaluation.data.passed
        assert deployment.type == "deployment.failed"
        assert summary.after is None
        assert f"the gate's verdict: {summary.verdict}; nothing was deployed" in printed
