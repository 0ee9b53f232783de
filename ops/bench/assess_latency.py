"""Benchmark: time the built-in assessors take per interaction, and what ruff would take.

Runs the ``AssessorPanel`` (every built-in assessor, through the plugin manager, with its
budget and breaker) and ``combine`` on the worked example (a 6-line answer) with no, some
and all evidence, and on a 318-line answer. Prints percentiles in milliseconds: the wall
time per interaction, and the time charged to an assessor's budget (5 ms,
``assessment.budget_ms``; garbage-collection pauses are not charged).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from flywheel_loop.engine.assessment import Evidence
from flywheel_loop.plugins.scoring import outcome_reward, quality_dimensions, ruff_lint
from flywheel_loop.plugins.scoring.panel import AssessorPanel, combine
from flywheel_loop.plugins.scoring.settings import AssessmentConfig
from flywheel_loop.schemas import parse_event

ROOT = Path(__file__).resolve().parents[2]

EXAMPLES = ROOT / "schemas" / "examples"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def evidences() -> list[Evidence]:
    def load(t: str) -> object:
        return parse_event((EXAMPLES / f"{t}.json").read_bytes()).data

    interaction = load("interaction.anonymized")
    feedback = load("feedback.anonymized").feedback  # type: ignore[attr-defined]
    outcome = load("outcome.anonymized").outcome  # type: ignore[attr-defined]
    iid = interaction.interaction_id  # type: ignore[attr-defined]
    # a longer answer too: 40 functions of code, which is what a big refactor looks like
    body = "\n\n".join(
        f"def f{i}(x: int) -> int:\n    if x > {i}:\n        return x - {i}\n    for j in range(x):\n"
        f"        x += j if j % 2 else -j\n    return x\n"
        for i in range(40)
    )
    recorded = interaction.interaction  # type: ignore[attr-defined]
    long = interaction.model_copy(  # type: ignore[attr-defined]
        update={"interaction": recorded.model_copy(update={"output": f"```python\n{body}```"})}
    )
    return [
        Evidence(iid, interaction, (), ()),  # type: ignore[arg-type]
        Evidence(iid, interaction, (), (outcome,)),  # type: ignore[arg-type]
        Evidence(iid, interaction, (feedback,), (outcome,)),  # type: ignore[arg-type]
        Evidence(iid, long, (feedback,), (outcome,)),  # type: ignore[arg-type]
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--iterations", type=int, default=2000, help="panel runs per evidence set")
    parser.add_argument("--ruff-runs", type=int, default=50)
    args = parser.parse_args()

    cfg = AssessmentConfig(budget_ms=1e6)  # measure, don't fall back
    panel = AssessorPanel([outcome_reward.ASSESSOR, quality_dimensions.ASSESSOR], cfg)
    # per answer size: wall time per interaction (panel + combine), and what each call was
    # charged against its budget (wall time less garbage-collection pauses)
    wall: dict[str, list[float]] = {"typical": [], "long": []}
    charged: dict[str, list[float]] = {"typical": [], "long": []}
    for ev in evidences():
        size = "long" if len(ev.interaction.interaction.output) > 2000 else "typical"
        for _ in range(args.iterations):
            t = time.perf_counter()
            results = panel.assess(ev)
            combine(results, cfg)
            wall[size].append((time.perf_counter() - t) * 1000)
            charged[size] += [r.elapsed_ms for r in results]

    out: dict[str, float | int] = {}
    for size, prefix in (("typical", "assess"), ("long", "assess_long_answer")):
        out[f"{prefix}_p50_ms"] = round(percentile(wall[size], 0.5), 4)
        out[f"{prefix}_p99_ms"] = round(percentile(wall[size], 0.99), 4)
        out[f"{prefix}_charged_p99_ms"] = round(percentile(charged[size], 0.99), 4)
    out["samples"] = sum(len(v) for v in wall.values())
    if ruff_lint.ruff_binary() is not None:
        ev = evidences()[0]
        ruff_ms = []
        for _ in range(args.ruff_runs):
            t = time.perf_counter()
            ruff_lint.assess(ev)
            ruff_ms.append((time.perf_counter() - t) * 1000)
        out["ruff_p50_ms"] = round(percentile(ruff_ms, 0.5), 3)
        out["ruff_p99_ms"] = round(percentile(ruff_ms, 0.99), 3)
    if args.json:
        print(json.dumps(out))
    else:
        for key, value in out.items():
            print(f"{key:>32}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
