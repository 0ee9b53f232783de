"""``flywheel train --dataset`` trains here and puts the run on the log; ``flywheel runs`` lists
it; ``flywheel train`` (requesting) follows one request's story to its verdict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from typer.testing import CliRunner

from flywheel_loop.engine.cli import app
from flywheel_loop.engine.embedded import EmbeddedServer
from flywheel_loop.plugins.training.commands import RunWatcher
from flywheel_loop.schemas import (
    DatasetBuilt,
    EvaluationCompleted,
    EvaluationProgressed,
    TrainingCompleted,
    TrainingProgressed,
    TrainingStarted,
    new_event,
    new_id,
)
from tests.test_trainer import formatter, tiny_model_dir, tiny_sections, write_dataset  # noqa: F401

runner = CliRunner()


@pytest.fixture
def env(tmp_path: Path, nats_server: EmbeddedServer, tiny_model_dir: Path,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> Path:
    state = tmp_path / "state"
    monkeypatch.setenv("FLYWHEEL_NATS__URL", nats_server.url)
    monkeypatch.setenv("FLYWHEEL_STATE_DIR", str(state))
    for section, values in tiny_sections(tiny_model_dir, epochs=1).items():
        for key, value in values.items():
            monkeypatch.setenv(f"FLYWHEEL_{section.upper()}__{key.upper()}", str(value))
    return state


def test_train_a_dataset_here_then_list_the_run(env: Path, formatter: Any) -> None:  # noqa: F811
    digest, _ = write_dataset(env, formatter)
    result = runner.invoke(app, ["train", "--role", "coder", "--dataset", digest[:10]])
    assert result.exit_code == 0, result.output
    assert "adapter " in result.output
    listed = runner.invoke(app, ["events", "--type", "training.completed", "--json"])
    (done,) = [orjson.loads(line) for line in listed.output.splitlines() if line.startswith("{")]
    assert done["data"]["dataset_hash"] == digest and Path(done["data"]["path"]).is_dir()

    shown = runner.invoke(app, ["runs", "--json"])
    assert shown.exit_code == 0, shown.output
    runs = orjson.loads(shown.output)["runs"]
    assert [(r["run_id"], r["status"]) for r in runs] == [(done["data"]["run_id"], "completed")]

    missing = runner.invoke(app, ["train", "--role", "coder", "--dataset", "ffff"])
    assert missing.exit_code == 2 and "no dataset 'ffff'" in missing.output


def test_the_watcher_follows_only_its_request_to_the_verdict() -> None:
    req0, req1 = new_id(), new_id()
    watcher = RunWatcher(req1, "coder")
    other = DatasetBuilt(role="coder", dataset_hash="cd" * 32, request_id=req0, sizes={}, path="x")
    mine = DatasetBuilt(role="coder", dataset_hash="ab" * 32, request_id=req1, sizes={"train": 3}, path="x")
    story = [
        other, mine,
        TrainingStarted(run_id="r0", role="coder", dataset_hash="cd" * 32, base_model="b"),
        TrainingStarted(run_id="r1", role="coder", dataset_hash="ab" * 32, base_model="b"),
        TrainingProgressed(run_id="r1", step=1, total_steps=2, loss=1.0),
        EvaluationCompleted(run_id="r0", role="coder", passed=True),
        TrainingCompleted(run_id="r1", role="coder", adapter_hash="ef" * 32, path="p", base_model="b"),
    ]
    assert not any(watcher.see(new_event(p, source="t")) for p in story)
    assert (watcher.dataset, watcher.run_id, watcher.adapter) == ("ab" * 32, "r1", "ef" * 32)
    # the evaluation's progress moves a bar of its own; another run's does not
    assert not watcher.see(new_event(EvaluationProgressed(run_id="r0", role="coder", step="x"), source="t"))
    assert watcher.eval_bar is None
    step = EvaluationProgressed(run_id="r1", role="coder", step="suite coding_suite (candidate)", done=3, total=8,
                                steps_done=8, steps_total=10)
    assert not watcher.see(new_event(step, source="t"))
    assert watcher.eval_bar is not None
    (task,) = watcher.eval_bar.tasks
    assert (task.description, task.completed, task.total, task.fields["step"]) == (step.step, 3, 8, "9/10")
    verdict = EvaluationCompleted(run_id="r1", role="coder", passed=False, reasons=["failed: x"])
    assert watcher.see(new_event(verdict, source="t"))
    assert watcher.verdict == verdict


async def test_following_the_log_from_a_position_ends_at_the_verdict(settings: Any, bus: Any) -> None:
    from flywheel_loop.plugins.training.commands import _follow

    request = new_id()
    before = new_event(EvaluationCompleted(run_id="r1", role="coder", passed=True), source="t")
    await bus.publish(before)  # before the request: not followed
    start = await bus.last_sequence("log") + 1
    story = [
        DatasetBuilt(role="coder", dataset_hash="ab" * 32, request_id=request, sizes={"train": 3}, path="x"),
        TrainingStarted(run_id="r1", role="coder", dataset_hash="ab" * 32, base_model="b"),
        TrainingProgressed(run_id="r1", step=1, total_steps=1, loss=0.5),
        TrainingCompleted(run_id="r1", role="coder", adapter_hash="ef" * 32, path="p", base_model="b"),
        EvaluationCompleted(run_id="r1", role="coder", passed=False, reasons=["failed: forgetting rate 0.5"]),
    ]
    for payload in story:
        await bus.publish(new_event(payload, source="t"))
    watcher = RunWatcher(request, "coder")
    await _follow(settings, watcher, start, timeout=20)
    assert watcher.verdict is not None and watcher.verdict.reasons == ["failed: forgetting rate 0.5"]

    stuck = RunWatcher(new_id(), "coder")
    with pytest.raises(TimeoutError):
        await _follow(settings, stuck, start, timeout=2)
