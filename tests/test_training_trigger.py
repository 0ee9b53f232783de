"""The training trigger: one request per crossing, also across restarts and redeliveries."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from flywheel_loop.engine.bus import Bus
from flywheel_loop.engine.config import Settings, load_settings
from flywheel_loop.engine.processor import ProcessContext, apply_step
from flywheel_loop.engine.state import ProcessorState
from flywheel_loop.plugins.curation.settings import CurationConfig
from flywheel_loop.plugins.curation.trigger import TriggerState, processor
from flywheel_loop.plugins.shared.training_requests import request_training
from flywheel_loop.schemas import (
    DatasetSkipped,
    DriftDetected,
    Event,
    QualityAssessed,
    TrainingCompleted,
    TrainingFailed,
    new_event,
    new_id,
)
from tests.conftest import read_log, wait_for

TRIGGER = {"export_min": 3, "train_min": 4, "min_interval_s": 0}


@pytest.fixture
def settings(settings_with: Callable[..., Settings]) -> Settings:
    return settings_with(curation={"trigger": TRIGGER})


def score(role: str = "coder", reward: float = 0.9, complexity: str | None = "moderate", iid: str | None = None) -> Any:
    return new_event(
        QualityAssessed(
            interaction_id=iid or new_id(), role=role, complexity=complexity, scores={"x": reward},
            reward=reward, confidence=1.0,
        ),
        source="test",
    )


async def requests(bus: Bus) -> list[Event[Any]]:
    return await read_log(bus, "log", "training.requested")


async def positions(bus: Bus) -> dict[str, int]:
    """event id -> log sequence, for every event on the log."""
    sub = await bus.js.subscribe("fw.log.>", ordered_consumer=True, stream=bus.streams.log)
    out: dict[str, int] = {}
    try:
        for _ in range(await bus.last_sequence("log")):
            msg = await sub.next_msg(timeout=5)
            out[msg.headers["Nats-Msg-Id"]] = msg.metadata.sequence.stream
    finally:
        await sub.unsubscribe()
    return out


async def test_a_threshold_fires_exactly_once_per_crossing_also_across_a_restart(
    bus: Bus, engine_with: Any, settings: Settings
) -> None:
    only = {"training_trigger"}
    first = [score() for _ in range(4)]
    async with engine_with(only=only):
        for event in first:
            await bus.publish(event)
        await wait_for(lambda: requests(bus))
        # re-scoring an interaction already counted, and low scores, count nothing
        await bus.publish(score(iid=first[0].data.interaction_id, reward=0.95))
        await bus.publish(score(reward=0.2))
        await bus.publish(score(reward=0.74, complexity="expert"))  # expert needs 0.8
        await wait_for(lambda: _consumed(bus, "training_trigger"))
    [req] = await requests(bus)
    seqs = await positions(bus)
    assert req.data.reason == "volume" and req.data.role == "coder"
    assert req.data.log_position == seqs[first[-1].id]  # the event that tipped it
    assert req.data.examples == 4 and req.causation_id == first[-1].id

    # Restart: the counters come back from the state folder, the consumer resumes; nothing fires
    # again, and a run is in flight until it completes.
    more = [score() for _ in range(3)]
    async with engine_with(only=only):
        for event in more:
            await bus.publish(event)
        await wait_for(lambda: _consumed(bus, "training_trigger"))
        assert len(await requests(bus)) == 1  # crossed again, but a run is in flight
        done = new_event(TrainingCompleted(run_id="r1", role="coder", adapter_hash="a" * 16, path="x",
                                           base_model="b"), source="test")
        await bus.publish(done)
        await wait_for(lambda: _count(bus, 2))
    reqs = await requests(bus)
    seqs = await positions(bus)
    assert [r.data.reason for r in reqs] == ["volume", "volume"]
    assert reqs[1].data.log_position == seqs[done.id] and reqs[1].data.examples == 7
    assert "3 new high-quality coder examples" in reqs[1].data.detail

    # A third engine sees nothing new: still exactly two requests.
    async with engine_with(only=only):
        await bus.publish(score(reward=0.1))
        await wait_for(lambda: _consumed(bus, "training_trigger"))
    assert len(await requests(bus)) == 2


async def _consumed(bus: Bus, name: str) -> bool:
    info = await bus.js.consumer_info(bus.streams.log, name)
    return info.num_pending == 0 and info.num_ack_pending == 0


async def _count(bus: Bus, n: int) -> bool:
    return len(await requests(bus)) >= n


class Folded:
    """The trigger as every worker runs it, without a bus: its state folded from the events given
    at the log positions given (kept under ``state``), then the input handled."""

    def __init__(self, settings: Settings, state: Path) -> None:
        self.processor = processor(settings)
        self.state = ProcessorState.open(self.processor, state / "state.sqlite")
        self.settings = settings

    def step(self, event: Event[Any], seq: int) -> list[Any]:
        self.state.fold([(seq, event)])
        ctx = ProcessContext(settings=self.settings, log=logging.getLogger("test"), sequence=seq, store=self.state)
        return asyncio.run(apply_step(self.processor, event, ctx))


def test_a_redelivered_event_gives_the_same_answer_and_changes_nothing(tmp_path: Path) -> None:
    settings = load_settings(state_dir=tmp_path, curation={"trigger": TRIGGER})
    events = [score() for _ in range(4)]
    trigger = Folded(settings, tmp_path)
    outputs = [trigger.step(e, seq) for seq, e in enumerate(events, 1)]
    assert [len(o) for o in outputs] == [0, 0, 0, 1]
    # the process restarts and the last event is delivered again (its ack was lost)
    restarted = Folded(settings, tmp_path)
    assert restarted.step(events[-1], 4) == outputs[-1]
    state = TriggerState(restarted.state.db)
    assert state.counts("coder", 0) == (4, 4)
    assert state.role("coder")["covered"] == 4
    # redelivering the earlier ones neither counts them twice nor fires
    for seq, e in enumerate(events[:3], 1):
        assert restarted.step(e, seq) == []
    assert state.counts("coder", 4) == (0, 4)


def test_drift_requests_at_once_or_when_the_run_in_flight_ends(tmp_path: Path) -> None:
    settings = load_settings(state_dir=tmp_path, curation={"trigger": {**TRIGGER, "min_interval_s": 3600}})
    trigger = Folded(settings, tmp_path)

    def drift() -> Event[Any]:
        return new_event(DriftDetected(role="fixer", metric="reward", window=200, baseline_value=0.8,
                                       current_value=0.6, drop=0.2), source="test")

    [first] = trigger.step(drift(), 1)
    assert first.reason == "drift" and "reward dropped 0.2" in first.detail
    assert trigger.step(drift(), 2) == []  # in flight: remembered
    failed = new_event(TrainingFailed(run_id="r", role="fixer", reason="oom"), source="test")
    [second] = trigger.step(failed, 3)
    assert second.reason == "drift" and second.log_position == 3
    # a dataset.skipped for the request in flight ends it too
    state = TriggerState(trigger.state.db)
    in_flight = state.role("fixer")["in_flight"]
    skipped = new_event(DatasetSkipped(role="fixer", request_id=in_flight, reason="no_data", detail="nothing"),
                        source="test")
    assert trigger.step(skipped, 4) == []
    assert state.role("fixer")["in_flight"] is None


def test_complexity_moves_the_quality_bar(tmp_path: Path) -> None:
    curation = CurationConfig.of(load_settings(state_dir=tmp_path))
    assert curation.is_high_quality(0.65, "simple") and not curation.is_high_quality(0.65, "moderate")
    assert curation.is_high_quality(0.7, None) and curation.is_high_quality(0.7, "moderate")
    assert not curation.is_high_quality(0.74, "complex") and curation.is_high_quality(0.75, "complex")
    assert not curation.is_high_quality(0.79, "expert") and curation.is_high_quality(0.8, "expert")


async def test_a_manual_request_covers_the_log_as_it_is_and_blocks_the_role(
    bus: Bus, engine_with: Any, settings: Settings
) -> None:
    await bus.publish(score())
    manual = await request_training(bus, "coder")
    assert manual.data.reason == "manual" and manual.data.log_position == 1
    async with engine_with(only={"training_trigger"}):
        for _ in range(5):
            await bus.publish(score())
        await wait_for(lambda: _consumed(bus, "training_trigger"))
    assert [r.id for r in await requests(bus)] == [manual.id]  # in flight: volume waits
