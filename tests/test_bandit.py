"""Bandits: policies in a simulated environment (pure), and the Selector and the
``bandit_state`` projection against a real NATS (routing rules, replay, live folding)."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from flywheel_loop.engine.bus import Bus
from flywheel_loop.engine.config import Settings
from flywheel_loop.engine.replay import differences, rebuild
from flywheel_loop.plugins.insight.bandit_state import BanditStateProjection
from flywheel_loop.schemas import QualityAssessed, new_event, new_id
from flywheel_loop.sdk.bandit import (
    BanditConfig,
    BanditState,
    Credit,
    EpsilonGreedy,
    Policy,
    ThompsonSampling,
    make_policy,
)
from flywheel_loop.sdk.selector import NoEligibleArm, Selector
from tests.conftest import RunningEngine, read_log, wait_for

#: The simulated environment: each prompt variant succeeds with this probability.
SUCCESS = {"terse": 0.3, "stepwise": 0.5, "tests-first": 0.7}
BEST = "tests-first"
SEEDS = range(5)


def simulate(policy: Policy, seed: int, pulls: int) -> tuple[list[str], BanditState]:
    """Pull ``pulls`` times; each pull's Bernoulli reward is folded like a quality.assessed."""
    rng, world = random.Random(seed), random.Random(10_000 + seed)
    state = BanditState()
    picks = []
    for i in range(pulls):
        arm = policy.choose(list(SUCCESS), state.stats("coder", "prompt_variant"), rng)
        reward = 1.0 if world.random() < SUCCESS[arm] else 0.0
        state.credit(f"interaction-{i}", Credit("coder", arm, None, reward))
        picks.append(arm)
    return picks, state


@pytest.mark.parametrize("seed", SEEDS)
def test_thompson_finds_the_best_arm_within_300_pulls_and_still_explores(seed: int) -> None:
    picks, state = simulate(ThompsonSampling(), seed, pulls=1000)
    # found: from pull 300 on, every window of 100 pulls takes the best arm at least 70 times
    for start in range(300, 901, 50):
        assert picks[start : start + 100].count(BEST) >= 70, (seed, start)
    # explored: no arm was written off without trying it a few times
    assert min(picks.count(arm) for arm in SUCCESS) >= 3
    stats = state.stats("coder", "prompt_variant")
    assert sum(s.pulls for s in stats.values()) == 1000


@pytest.mark.parametrize("seed", SEEDS)
def test_epsilon_greedy_finds_the_best_arm_and_keeps_exploring_at_epsilon(seed: int) -> None:
    picks, _ = simulate(EpsilonGreedy(0.1), seed, pulls=3000)
    later = picks[500:]
    assert max(SUCCESS, key=later.count) == BEST
    # a random arm one time in ten: two in three of those are not the best (expected 0.067)
    off_best = sum(p != BEST for p in later) / len(later)
    assert 0.045 <= off_best <= 0.09, off_best


def test_a_reassessed_interaction_replaces_its_reward() -> None:
    state = BanditState()
    state.credit("i1", Credit("coder", "v1", "m1", 0.2))
    state.credit("i1", Credit("coder", "v1", "m1", 0.9))  # new evidence, new score
    state.credit("i2", Credit("coder", "v1", None, 0.5))
    v1 = state.stats("coder", "prompt_variant")["v1"]
    assert v1.pulls == 2 and v1.reward_sum == pytest.approx(1.4)
    assert state.stats("coder", "model")["m1"].pulls == 1


def test_fractional_rewards_are_learned_too() -> None:
    rng = random.Random(3)
    state = BanditState()
    means = {"a": 0.45, "b": 0.6}
    picks = []
    for i in range(600):
        arm = ThompsonSampling().choose(list(means), state.stats("r", "model"), rng)
        state.credit(str(i), Credit("r", None, arm, min(1.0, max(0.0, rng.gauss(means[arm], 0.1)))))
        picks.append(arm)
    assert picks[300:].count("b") > 240


def test_the_policy_is_chosen_by_name() -> None:
    assert make_policy("thompson").name == "thompson"
    assert isinstance(make_policy("epsilon_greedy", 0.2), EpsilonGreedy)
    with pytest.raises(ValueError, match="thompson"):
        make_policy("ucb")


# --------------------------------------------------------------------------- through NATS

MODELS = [
    {"name": "tiny", "cost_per_token": 0.0, "max_complexity": "simple"},
    {"name": "mid", "cost_per_token": 1e-6, "max_complexity": "complex"},
    {"name": "big", "cost_per_token": 8e-6, "max_complexity": "expert"},
]


BANDIT = BanditConfig(prompt_variants={"coder": ["v-good", "v-bad"]}, models=MODELS, seed=11)


def assessed(iid: str, reward: float, variant: str | None = "v-good", model: str | None = "mid") -> Any:
    data = QualityAssessed(
        interaction_id=iid,
        role="coder",
        prompt_variant=variant,
        model_id=model,
        scores={"test": reward},
        reward=reward,
        confidence=1.0,
    )
    return new_event(data, source="test", correlation_id=iid)


async def test_model_routing_respects_the_cost_cap_and_the_complexity(settings: Settings, bus: Bus) -> None:
    async with Selector(BANDIT, settings) as selector:
        # expert work: only "big" handles it
        assert {selector.select_model("coder", "expert") for _ in range(20)} == {"big"}
        # a cost cap of 2e-6 per token leaves tiny and mid; complex work leaves only mid
        assert {selector.select_model("coder", None, 2e-6) for _ in range(40)} == {"tiny", "mid"}
        assert {selector.select_model("coder", "complex", 2e-6) for _ in range(20)} == {"mid"}
        with pytest.raises(NoEligibleArm, match="no model for 'coder' at complexity expert under 2e-06"):
            selector.select_model("coder", "expert", 2e-6)
        with pytest.raises(NoEligibleArm, match="bandit.prompt_variants.judge"):
            selector.select_prompt("judge")
        await selector.recorder.flush(10)
    choices = await read_log(bus, "log", "arm.selected")
    assert len(choices) == 80
    capped = [c.data for c in choices if c.data.max_cost_per_token == 2e-6 and c.data.complexity == "complex"]
    assert capped and all(c.candidates == ["mid"] and c.arm == "mid" for c in capped)
    assert all(c.data.policy == "thompson" and c.data.decision == "model" for c in choices)


async def test_selector_and_projection_fold_the_log_to_the_same_state_and_replay_exactly(
    settings: Settings, bus: Bus, engine_with: Callable[..., RunningEngine], tmp_path: Path
) -> None:
    ids = [new_id() for _ in range(20)]
    for i, iid in enumerate(ids):  # v-good earns 0.9, v-bad 0.1; some are re-assessed later
        await bus.publish(assessed(iid, 0.9 if i % 2 else 0.1, "v-good" if i % 2 else "v-bad", "mid"))
    for iid in ids[:6]:
        await bus.publish(assessed(iid, 0.3, "v-bad", "tiny"))
    async with engine_with(only={"bandit_state"}) as running, Selector(BANDIT, settings) as selector:
        picks = [selector.select_prompt("coder") for _ in range(200)]
        # a reward published while the selector runs reaches it without a restart
        late = assessed(new_id(), 0.7, "v-good", "big")
        ack = await bus.publish(late)
        await wait_for(lambda: selector.position >= ack.seq)
        await selector.recorder.flush(10)
        projection = running.projection("bandit_state")
        await projection.catch_up()
        rows = projection.store.db.execute(
            "SELECT role, decision, arm, pulls, reward_sum, selected FROM arms"
        )
        table = {(r, d, a): (n, s, c) for r, d, a, n, s, c in rows.fetchall()}
        fresh = tmp_path / "bandit_state.replayed.sqlite"
        await rebuild(bus, BanditStateProjection(), fresh)
        assert differences(projection.store.path, fresh) == []

    assert picks.count("v-good") > 180  # learned from the log before the first choice
    memory = {k: (s.pulls, s.reward_sum) for k, s in selector.state.arms.items()}
    # the selector's memory and the projection hold the same numbers, bit for bit
    assert memory == {k: (n, s) for k, (n, s, _) in table.items() if k in memory}
    assert all(n == 0 for k, (n, _, _) in table.items() if k not in memory)
    # 10 odd ids earned v-good; 3 of them were re-assessed as v-bad; the late one adds 1
    assert table[("coder", "prompt_variant", "v-good")][0] == 8
    assert table[("coder", "model", "big")][:2] == (1, 0.7)
    assert sum(c for (_, d, _), (_, _, c) in table.items() if d == "prompt_variant") == 200
