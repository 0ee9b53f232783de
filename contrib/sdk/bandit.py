"""Bandits: choosing a prompt variant or a model from the rewards seen so far.

Pure code, no I/O. The state is a fold of ``quality.assessed`` events: per (role, decision,
arm) the number of rewarded interactions and the sum of their rewards. An interaction that
is re-assessed (new evidence) replaces its previous reward instead of adding a second
pull. ``credit_changes`` is that fold written once; the ``bandit_state`` projection
(SQLite) and the in-process ``Selector`` (memory) both apply it, in log order, so they hold
the same numbers, bit for bit.

Policies choose among candidate arms with a caller-supplied ``random.Random``, so a seeded
run is reproducible:

- ``ThompsonSampling`` (the default): a Beta(1 + rewards, 1 + pulls - rewards) posterior per
  arm, treating a reward in [0, 1] as a fractional success; it samples each posterior and
  takes the best sample, so it explores exactly as much as it is unsure.
- ``EpsilonGreedy`` (epsilon 0.1, as in the reference design): a random arm with
  probability epsilon, else the best mean; untried arms are tried first.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator

from flywheel_loop.schemas.events import Complexity


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelArm(_Strict):
    """A model the router may choose: what a token costs and the hardest task it handles."""

    name: str = Field(min_length=1, max_length=200)
    cost_per_token: float = Field(ge=0, description="USD per token")
    max_complexity: Literal["simple", "moderate", "complex", "expert"] = "expert"


class BanditConfig(_Strict):
    """Prompt-variant selection and model routing, learned from ``quality.assessed`` rewards."""

    policy: Literal["thompson", "epsilon_greedy"] = "thompson"
    epsilon: float = Field(default=0.1, ge=0, le=1, description="exploration rate of epsilon_greedy")
    seed: int | None = Field(default=None, description="fix the selector's random choices (tests, replays)")
    prompt_variants: dict[str, list[str]] = Field(
        default_factory=dict, description="role -> the prompt variant ids to choose from"
    )
    models: list[ModelArm] = Field(default_factory=list)

    @field_validator("prompt_variants")
    @classmethod
    def _variants(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for role, variants in value.items():
            if not variants or len(set(variants)) != len(variants) or not all(variants):
                raise ValueError(f"{role}: a non-empty list of distinct, non-empty variant ids")
        return value

    @field_validator("models")
    @classmethod
    def _distinct_models(cls, value: list[ModelArm]) -> list[ModelArm]:
        names = [m.name for m in value]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be distinct, got {names}")
        return value


Decision = Literal["prompt_variant", "model"]
ArmKey = tuple[str, str, str]  # (role, decision, arm)

#: Task complexities from easiest to hardest; a model serves up to its ``max_complexity``.
COMPLEXITY_ORDER: tuple[str, ...] = get_args(Complexity)


@dataclass
class ArmStats:
    """What is known about one arm: rewarded interactions and the sum of their rewards."""

    pulls: int = 0
    reward_sum: float = 0.0

    @property
    def mean(self) -> float | None:
        return self.reward_sum / self.pulls if self.pulls else None


@dataclass(frozen=True)
class Credit:
    """The reward one interaction gives to the arms it used."""

    role: str
    prompt_variant: str | None
    model_id: str | None
    reward: float

    def arms(self) -> list[ArmKey]:
        keys: list[ArmKey] = []
        if self.prompt_variant is not None:
            keys.append((self.role, "prompt_variant", self.prompt_variant))
        if self.model_id is not None:
            keys.append((self.role, "model", self.model_id))
        return keys


def credit_changes(previous: Credit | None, current: Credit) -> list[tuple[ArmKey, int, float]]:
    """(arm, pulls delta, reward delta) steps that replace ``previous`` by ``current``.

    The previous credit is withdrawn first, then the new one added, as separate steps, so
    every holder of the state performs the same float operations in the same order.
    """
    steps: list[tuple[ArmKey, int, float]] = []
    if previous is not None:
        steps += [(key, -1, -previous.reward) for key in previous.arms()]
    steps += [(key, 1, current.reward) for key in current.arms()]
    return steps


@dataclass
class BanditState:
    """The in-memory fold: arm statistics and the credit each interaction last gave."""

    arms: dict[ArmKey, ArmStats] = field(default_factory=dict)
    credits: dict[str, Credit] = field(default_factory=dict)

    def credit(self, interaction_id: str, credit: Credit) -> None:
        """Fold one ``quality.assessed``: replace the interaction's previous credit."""
        for key, pulls, reward in credit_changes(self.credits.get(interaction_id), credit):
            stats = self.arms.setdefault(key, ArmStats())
            stats.pulls += pulls
            stats.reward_sum += reward
        self.credits[interaction_id] = credit

    def stats(self, role: str, decision: Decision) -> dict[str, ArmStats]:
        return {arm: s for (r, d, arm), s in self.arms.items() if r == role and d == decision}


class Policy(Protocol):
    name: str

    def choose(self, candidates: Sequence[str], stats: Mapping[str, ArmStats], rng: random.Random) -> str:
        """One of ``candidates`` (non-empty), given what is known about each."""
        ...


class ThompsonSampling:
    """Sample each arm's Beta posterior; take the best sample."""

    name = "thompson"

    def choose(self, candidates: Sequence[str], stats: Mapping[str, ArmStats], rng: random.Random) -> str:
        best, best_sample = candidates[0], -1.0
        for arm in candidates:
            s = stats.get(arm) or ArmStats()
            # max(): a re-assessment's float steps may leave pulls - rewards at -1e-16
            sample = rng.betavariate(1.0 + max(s.reward_sum, 0.0), 1.0 + max(s.pulls - s.reward_sum, 0.0))
            if sample > best_sample:
                best, best_sample = arm, sample
        return best


class EpsilonGreedy:
    """A random arm with probability epsilon; otherwise the best mean (untried arms first)."""

    name = "epsilon_greedy"

    def __init__(self, epsilon: float = 0.1) -> None:
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"epsilon {epsilon!r}: must be in [0, 1]")
        self.epsilon = epsilon

    def choose(self, candidates: Sequence[str], stats: Mapping[str, ArmStats], rng: random.Random) -> str:
        if rng.random() < self.epsilon:
            return rng.choice(list(candidates))
        untried = [a for a in candidates if not (stats.get(a) and stats[a].pulls > 0)]
        if untried:
            return rng.choice(untried)
        means = {a: stats[a].mean or 0.0 for a in candidates}
        top = max(means.values())
        return rng.choice([a for a in candidates if means[a] == top])


def make_policy(name: str, epsilon: float = 0.1) -> Policy:
    """The policy configured as ``bandit.policy``."""
    if name == "thompson":
        return ThompsonSampling()
    if name == "epsilon_greedy":
        return EpsilonGreedy(epsilon)
    raise ValueError(f"bandit.policy {name!r}: choose 'thompson' or 'epsilon_greedy'")


def serves(max_complexity: str, complexity: str | None) -> bool:
    """Whether a model rated up to ``max_complexity`` may take a task of ``complexity``."""
    if complexity is None:
        return True
    return COMPLEXITY_ORDER.index(max_complexity) >= COMPLEXITY_ORDER.index(complexity)
