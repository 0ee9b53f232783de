"""The gate's statistics, standard library only: paired outcomes of two models on the same items.

- ``mcnemar_p``: the exact McNemar test, a two-sided binomial test on the discordant pairs (items
  one model solved and the other did not);
- ``wilson``: the Wilson score interval of a proportion (the share of solved problems a
  candidate lost, a pass@1);
- ``newcombe_paired``: Newcombe's interval (his method 10, from two Wilson intervals and the
  pairs' correlation) of the difference of two paired proportions: the candidate's pass rate
  minus the model in service's, on the same items.

References: R. G. Newcombe, "Improved confidence intervals for the difference between binomial
proportions based on paired data", Statistics in Medicine 17 (1998) 2635-2650; E. B. Wilson (1927).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

__all__ = ["Paired", "mcnemar_p", "newcombe_paired", "wilson", "z_of"]


def z_of(confidence: float) -> float:
    """The two-sided normal quantile for ``confidence`` (0.95 -> 1.96)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, not {confidence}")
    return NormalDist().inv_cdf(1 - (1 - confidence) / 2)


def wilson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of ``k`` successes in ``n`` trials ((0, 1) when n is 0)."""
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    z = z_of(confidence)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_p(first_only: int, second_only: int) -> float:
    """Exact two-sided McNemar p-value: under "no difference" each discordant pair goes either way
    with probability 1/2; 1.0 when there is no discordant pair."""
    n = first_only + second_only
    if n == 0:
        return 1.0
    k = min(first_only, second_only)
    tail: float = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


@dataclass(frozen=True)
class Paired:
    """Two models' outcomes (solved or not) on the same items, in the same order."""

    candidate: tuple[bool, ...]
    baseline: tuple[bool, ...]

    def __post_init__(self) -> None:
        if len(self.candidate) != len(self.baseline):
            raise ValueError(f"paired outcomes need as many candidate ({len(self.candidate)})"
                             f" as baseline ({len(self.baseline)}) items")

    @classmethod
    def of(cls, candidate: Sequence[bool], baseline: Sequence[bool]) -> Paired:
        return cls(tuple(bool(x) for x in candidate), tuple(bool(x) for x in baseline))

    @property
    def items(self) -> int:
        return len(self.candidate)

    @property
    def table(self) -> tuple[int, int, int, int]:
        """(both solved, only the candidate, only the baseline, neither)."""
        pairs = list(zip(self.candidate, self.baseline, strict=True))
        return (sum(c and b for c, b in pairs), sum(c and not b for c, b in pairs),
                sum(b and not c for c, b in pairs), sum(not c and not b for c, b in pairs))

    def difference(self, confidence: float = 0.95) -> tuple[float, float, float]:
        """(candidate pass rate - baseline pass rate, low, high), as shares."""
        return newcombe_paired(*self.table, confidence=confidence)

    def p_value(self) -> float:
        _, cand_only, base_only, _ = self.table
        return mcnemar_p(cand_only, base_only)


def newcombe_paired(both: int, first_only: int, second_only: int, neither: int,
                    confidence: float = 0.95) -> tuple[float, float, float]:
    """(p1 - p2, low, high) for paired proportions from the 2x2 table (Newcombe's method 10, with
    his continuity correction of the correlation).
    With no item the difference is 0 and the interval (-1, 1)."""
    n = both + first_only + second_only + neither
    if min(both, first_only, second_only, neither) < 0:
        raise ValueError("the table's counts must not be negative")
    if n == 0:
        return 0.0, -1.0, 1.0
    p1, p2 = (both + first_only) / n, (both + second_only) / n
    l1, u1 = wilson(both + first_only, n, confidence)
    l2, u2 = wilson(both + second_only, n, confidence)
    denominator = (both + first_only) * (second_only + neither) * (both + second_only) * (first_only + neither)
    phi = 0.0
    if denominator > 0:
        # Newcombe's continuity correction: ad - bc shrinks by n/2 (not below 0) when positive, so that
        # all-concordant pairs do not collapse the interval to a point
        cross = float(both * neither - first_only * second_only)
        if cross > 0:
            cross = max(cross - n / 2, 0.0)
        phi = cross / math.sqrt(denominator)
    d1, d2 = p1 - l1, u2 - p2
    e1, e2 = u1 - p1, p2 - l2
    delta = math.sqrt(max(0.0, d1 * d1 - 2 * phi * d1 * d2 + d2 * d2))
    epsilon = math.sqrt(max(0.0, e1 * e1 - 2 * phi * e1 * e2 + e2 * e2))
    theta = p1 - p2
    return theta, max(-1.0, theta - delta), min(1.0, theta + epsilon)
