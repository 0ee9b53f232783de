"""The demo's simulated coding agent and the human who reviews its work.

For each task the agent asks the model in service (``engine/demo/models.py``), takes the code out
of the answer, runs the task's unit tests in the sandbox (``plugins/sandbox.py``: a separate,
limited process) and records what happened through the SDK:

- ``interaction.recorded``: role ``coder``, the model's name, the prompt and the answer, the
  tests in ``context.tests``, the task's domain, the tokens and the time it took;
- ``outcome.observed``: whether the code compiled, how many tests passed and failed, the errors;
- ``feedback.given`` (only while ``review`` is on, for the training tasks): the simulated human
  accepts an answer that passed its tests and follows the convention, and otherwise corrects it
  with the task's reference solution (which follows the convention), saying what was wrong.

Held-out tasks are worked without review: they only measure, and give nothing to train on.
``converse`` asks the demo's short questions: no tests, so no outcome; the reviewer accepts the
answer as given (``feedback.given`` accepted), which makes it a training example like any other.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from flywheel_loop.plugins.demo.models import Answerer
from flywheel_loop.plugins.demo.tasks import LICENSE_HEADER, LICENSE_ID, Question, Task
from flywheel_loop.sdk.recorder import Recorder

__all__ = ["ROLE", "Turn", "converse", "work"]

ROLE = "coder"


@dataclass(frozen=True)
class Turn:
    """One task worked: the interaction's id and what the agent saw (the figures come from the log)."""

    task_id: str
    interaction_id: str
    model_id: str
    passed: bool
    follows_convention: bool
    corrected: bool


def _review(task: Task, passed: bool, follows: bool, failures: int, total: int) -> dict[str, object]:
    """The simulated human's feedback: accept a good answer, otherwise correct it."""
    if passed and follows:
        return {"implicit": "accepted", "rating": 5, "time_to_accept_s": 5.0}
    problems = []
    if not passed:
        problems.append(f"{failures} of {total} tests failed" if total else "the code did not run")
    if not follows:
        problems.append(f"every file must start with `{LICENSE_HEADER}`")
    return {
        "implicit": "modified",
        "rating": 3 if passed else 2,
        "comment": "; ".join(problems),
        "correction": task.solution,
        "final_version": task.solution,
        "time_to_accept_s": 60.0,
    }


async def work(
    recorder: Recorder,
    model: Answerer,
    tasks: list[Task],
    session: str,
    review: bool,
    on_turn: Callable[[Turn], None],
    batch: int = 6,
) -> list[Turn]:
    """Work ``tasks`` with ``model``, recording each turn; ``on_turn`` is called after each one."""
    from flywheel_loop.plugins.shared.code import extract_code, follows_convention
    from flywheel_loop.plugins.shared.sandbox import run_tests

    turns: list[Turn] = []
    for start in range(0, len(tasks), batch):
        chunk = tasks[start : start + batch]
        answers = await asyncio.to_thread(model.answer_many, [t.prompt for t in chunk])
        for task, answer in zip(chunk, answers, strict=True):
            code = extract_code(answer.text)
            run = await asyncio.to_thread(run_tests, code, task.tests)
            passed = run.all_passed
            follows = follows_convention(code, LICENSE_ID)
            iid = await recorder.record_interaction(
                session_id=session,
                user_id="demo-developer",
                role=ROLE,
                model_id=model.name,
                input=task.prompt,
                output=answer.text or "(empty answer)",
                context={"project": "flywheel-demo", "language": "python", "tests": task.tests},
                duration_ms=answer.duration_ms,
                tokens={"prompt": answer.prompt_tokens, "completion": answer.completion_tokens},
                complexity="simple",
                domain=task.domain,
            )
            await recorder.record_outcome(
                iid,
                compiles=run.compiles,
                tests_passed=run.passed,
                tests_failed=run.failed,
                runtime_errors=0 if passed else len(run.errors),
                errors=[e[:500] for e in run.errors[:10]],
            )
            if review:
                await recorder.record_feedback(iid, **_review(task, passed, follows, run.failed, run.total))
            turn = Turn(task.id, iid, model.name, passed, follows, review and not (passed and follows))
            turns.append(turn)
            on_turn(turn)
    return turns


async def converse(
    recorder: Recorder,
    model: Answerer,
    questions: list[Question],
    session: str,
    on_turn: Callable[[Turn], None],
    batch: int = 8,
) -> list[Turn]:
    """Ask ``questions``; each answer is recorded and accepted as given."""
    turns: list[Turn] = []
    for start in range(0, len(questions), batch):
        chunk = questions[start : start + batch]
        answers = await asyncio.to_thread(model.answer_many, [q.prompt for q in chunk])
        for question, answer in zip(chunk, answers, strict=True):
            iid = await recorder.record_interaction(
                session_id=session,
                user_id="demo-developer",
                role=ROLE,
                model_id=model.name,
                input=question.prompt,
                output=answer.text or "(empty answer)",
                context={"project": "flywheel-demo"},
                duration_ms=answer.duration_ms,
                tokens={"prompt": answer.prompt_tokens, "completion": answer.completion_tokens},
                complexity="simple",
                domain="general",
            )
            await recorder.record_feedback(iid, implicit="accepted", rating=5, time_to_accept_s=3.0)
            turn = Turn(question.id, iid, model.name, passed=True, follows_convention=False, corrected=False)
            turns.append(turn)
            on_turn(turn)
    return turns
