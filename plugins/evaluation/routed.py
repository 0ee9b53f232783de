"""The candidate measured as it is served: the rows its router sends to the adapter answered by the adapter,
the others by the base model (``plugins/shared/routing.py``).

The gate compares what would be served with what is served. An adapter with a router answers only the
requests nearer to its role's training prompts; everything else goes to the base model. So each of the
gate's measurements on the candidate runs on two parts of its rows: the adapter's part with the adapter
on, the rest with the adapter off. Where the model in service is the base model itself, the rest is
exactly what was just measured on it (greedy, the same weights, the same rows), and its results are taken
from that measurement rather than computed twice; its share of the generated tokens and seconds is
counted pro rata, as the base model's speed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from flywheel_loop.plugins.evaluation.generation import Generations
from flywheel_loop.plugins.evaluation.metrics import TaskResult

__all__ = ["Split", "join_generations", "join_tasks", "pick_generations", "pick_tasks"]

T = TypeVar("T")


@dataclass(frozen=True)
class Split:
    """Per row, in order: True where the adapter answers it."""

    to_adapter: tuple[bool, ...]

    @classmethod
    def everything(cls, n: int) -> Split:
        return cls((True,) * n)

    @property
    def adapter_rows(self) -> int:
        return sum(self.to_adapter)

    @property
    def whole(self) -> bool:
        return all(self.to_adapter)

    def part(self, items: Sequence[T], adapter: bool = True) -> list[T]:
        return [x for x, a in zip(items, self.to_adapter, strict=True) if a == adapter]

    def join(self, adapter: Sequence[T], other: Sequence[T]) -> list[T]:
        """The two parts' per-row results back in the rows' order."""
        mine, rest = iter(adapter), iter(other)
        out = [next(mine) if a else next(rest) for a in self.to_adapter]
        if next(mine, None) is not None or next(rest, None) is not None:
            raise ValueError("a part has more results than the split has rows")
        return out


def _pro_rata(value: float, kept: int, of: int) -> float:
    return value * kept / of if of else 0.0


def pick_generations(g: Generations, keep: Sequence[bool]) -> Generations:
    """The answers of the rows in ``keep``, with their share of the tokens and seconds."""
    n = sum(keep)
    return Generations([t for t, k in zip(g.texts, keep, strict=True) if k],
                       round(_pro_rata(g.tokens, n, len(g.texts))), _pro_rata(g.seconds, n, len(g.texts)))


def join_generations(split: Split, adapter: Generations, other: Generations) -> Generations:
    return Generations(split.join(adapter.texts, other.texts), adapter.tokens + other.tokens,
                       adapter.seconds + other.seconds)


def pick_tasks(result: TaskResult, rows: Sequence[dict[str, Any]], keep: Sequence[bool]) -> TaskResult:
    """The rows in ``keep`` of a task measurement over ``rows`` (its rows with tests, in order)."""
    with_tests = [r for r in rows if r.get("tests")]
    keep_tested = [k for r, k in zip(rows, keep, strict=True) if r.get("tests")]
    outcomes = tuple(o for o, k in zip(result.outcomes, keep_tested, strict=True) if k)
    ids = {str(r.get("id", "?")) for r, k in zip(with_tests, keep_tested, strict=True) if k}
    failures = tuple(f for f in result.failures if f.split(": ", 1)[0] in ids)
    return TaskResult(len(outcomes), sum(outcomes), pick_generations(result.generations, keep_tested), failures,
                      outcomes)


def join_tasks(split: Split, rows: Sequence[dict[str, Any]], adapter: TaskResult, other: TaskResult) -> TaskResult:
    tested = Split(tuple(a for r, a in zip(rows, split.to_adapter, strict=True) if r.get("tests")))
    return TaskResult(adapter.examples + other.examples, adapter.passed + other.passed,
                      join_generations(tested, adapter.generations, other.generations),
                      adapter.failures + other.failures, tuple(tested.join(adapter.outcomes, other.outcomes)))


def routed(
    split: Split, rows: Sequence[Any], on_adapter: Callable[[list[Any]], T], on_base: Callable[[list[Any]], T],
    join: Callable[[T, T], T],
) -> T:
    """``on_adapter`` on the adapter's rows, ``on_base`` on the rest, joined."""
    if split.whole:
        return on_adapter(list(rows))
    return join(on_adapter(split.part(rows)), on_base(split.part(rows, adapter=False)))
