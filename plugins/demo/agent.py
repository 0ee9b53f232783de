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

Every event the agent records has an id derived from the session and the task (``event_id``), not a
random one: the dataset builder splits by interaction id, so the same run of the demo gets the same
splits, the same dataset and the same training. For the same reason the agent records no answer
duration (wall time on a shared CPU, which the reward would weigh in).

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
from flywheel_loop.schemas import FeedbackGiven, InteractionRecorded, OutcomeObserved, Payload, new_event
from flywheel_loop.schemas.ids import derive_id
from flywheel_loop.sdk.recorder import Recorder

__all__ = ["ROLE", "Turn", "converse", "event_id", "work"]

ROLE = "coder"

#: the root the demo's event ids are derived from (a fixed time prefix: the ids do not depend on the clock)
ID_ROOT = "01K0DEM0000000000000000000"


def event_id(session: str, item: str, kind: str) -> str:
    """The id of the ``kind`` event (interaction, outcome, feedback) of ``item`` in ``session``: the same
    in every run, so the builder's id-seeded split, and the dataset, are the same in every run."""
    return str(derive_id(ID_ROOT, session, item, kind))


def _record(recorder: Recorder, data: Payload, eid: str, correlation_id: str | None = None) -> str:
    recorder.enqueue(new_event(data, source=recorder.source, correlation_id=correlation_id, event_id=eid))
    return eid


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
    batch: int = 32,
) -> list[Turn]:
    """Work ``tasks`` with ``model``, recording each turn; ``on_turn`` is called after each one. The model
    gets ``batch`` tasks at once (the local model generates them as one batch, as the served model batches
    requests that arrive together). On a CPU a generated token's cost is mostly the read of the weights, shared
    by the rows of a batch: 32 demo tasks took 31.5 s as one batch and 49.9 s as two (2-core Xeon, float32),
    with the same answers."""
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
            iid = _record(recorder, InteractionRecorded.model_validate(dict(
                session_id=session,
                user_id="demo-developer",
                role=ROLE,
                model_id=model.name,
                input=task.prompt,
                output=answer.text or "(empty answer)",
                context={"project": "flywheel-demo", "language": "python", "tests": task.tests},
                # no duration: it is the busy CPU's wall time, and the reward weighs it in (the dataset
                # would differ from run to run by the machine's load)
                tokens={"prompt": answer.prompt_tokens, "completion": answer.completion_tokens},
                complexity="simple",
                domain=task.domain,
            )), event_id(session, task.id, "interaction"))
            _record(recorder, OutcomeObserved.model_validate(dict(
                interaction_id=iid,
                compiles=run.compiles,
                tests_passed=run.passed,
                tests_failed=run.failed,
                runtime_errors=0 if passed else len(run.errors),
                errors=[e[:500] for e in run.errors[:10]],
            )), event_id(session, task.id, "outcome"), iid)
            if review:
                feedback = _review(task, passed, follows, run.failed, run.total)
                _record(recorder, FeedbackGiven.model_validate({"interaction_id": iid, **feedback}),
                        event_id(session, task.id, "feedback"), iid)
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
    batch: int = 16,
) -> list[Turn]:
    """Ask ``questions``, ``batch`` at once; each answer is recorded and accepted as given."""
    turns: list[Turn] = []
    for start in range(0, len(questions), batch):
        chunk = questions[start : start + batch]
        answers = await asyncio.to_thread(model.answer_many, [q.prompt for q in chunk])
        for question, answer in zip(chunk, answers, strict=True):
            iid = _record(recorder, InteractionRecorded.model_validate(dict(
                session_id=session,
                user_id="demo-developer",
                role=ROLE,
                model_id=model.name,
                input=question.prompt,
                output=answer.text or "(empty answer)",
                context={"project": "flywheel-demo"},
                # no duration: it is the busy CPU's wall time, and the reward weighs it in (the dataset
                # would differ from run to run by the machine's load)
                tokens={"prompt": answer.prompt_tokens, "completion": answer.completion_tokens},
                complexity="simple",
                domain="general",
            )), event_id(session, question.id, "interaction"))
            _record(recorder, FeedbackGiven(interaction_id=iid, implicit="accepted", rating=5, time_to_accept_s=3.0),
                    event_id(session, question.id, "feedback"), iid)
            turn = Turn(question.id, iid, model.name, passed=True, follows_convention=False, corrected=False)
            turns.append(turn)
            on_turn(turn)
    return turns
