"""Benchmark: Selector.select_prompt / select_model latency, answered from local state.

A fresh nats-server gets ``--rewards`` quality.assessed events; a Selector folds them and
then answers ``--calls`` selections of each kind (each also enqueues an arm.selected event
for the background publisher). Prints percentiles in milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

from flywheel_loop.engine.bus import Bus  # noqa: E402
from flywheel_loop.engine.config import load_settings  # noqa: E402
from flywheel_loop.engine.embedded import EmbeddedServer  # noqa: E402
from flywheel_loop.schemas import QualityAssessed, new_event, new_id  # noqa: E402
from flywheel_loop.sdk.bandit import BanditConfig  # noqa: E402
from flywheel_loop.sdk.selector import Selector  # noqa: E402

VARIANTS = ["v1", "v2", "v3", "v4"]
MODELS = [
    {"name": "tiny", "cost_per_token": 0.0, "max_complexity": "simple"},
    {"name": "small", "cost_per_token": 2e-7, "max_complexity": "moderate"},
    {"name": "mid", "cost_per_token": 1e-6, "max_complexity": "complex"},
    {"name": "big", "cost_per_token": 8e-6, "max_complexity": "expert"},
]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def bench(calls: int, rewards: int, policy: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedServer(Path(tmp) / "nats").start()
        try:
            settings = load_settings(state_dir=Path(tmp) / "state", nats={"url": server.url})
            bandit = BanditConfig.model_validate(
                {"policy": policy, "prompt_variants": {"coder": VARIANTS}, "models": MODELS, "seed": 1}
            )
            bus = await Bus.connect(settings, server.url)
            await bus.ensure_streams()
            rng = random.Random(0)
            events = [
                new_event(
                    QualityAssessed(
                        interaction_id=new_id(),
                        role="coder",
                        prompt_variant=rng.choice(VARIANTS),
                        model_id=rng.choice(MODELS)["name"],  # type: ignore[arg-type]
                        scores={"x": 0.5},
                        reward=rng.random(),
                        confidence=1.0,
                    ),
                    source="bench",
                )
                for _ in range(rewards)
            ]
            for start in range(0, len(events), 1000):
                await bus.publish_many(events[start : start + 1000])
            await bus.close()

            async with Selector(bandit, settings) as selector:
                prompt_ms, model_ms = [], []
                for i in range(calls):
                    t = time.perf_counter()
                    selector.select_prompt("coder")
                    prompt_ms.append((time.perf_counter() - t) * 1000)
                    t = time.perf_counter()
                    selector.select_model("coder", "moderate", 2e-6)
                    model_ms.append((time.perf_counter() - t) * 1000)
                    if i % 500 == 0:
                        await asyncio.sleep(0)  # let the publisher drain, as an agent's loop would
                await selector.recorder.flush(60)
            both = prompt_ms + model_ms
            return {
                "select_p50_ms": round(percentile(both, 0.50), 4),
                "select_p99_ms": round(percentile(both, 0.99), 4),
                "select_max_ms": round(max(both), 4),
                "select_prompt_p99_ms": round(percentile(prompt_ms, 0.99), 4),
                "select_model_p99_ms": round(percentile(model_ms, 0.99), 4),
                "calls": 2 * calls,
                "rewards_folded": rewards,
                "policy": policy,  # type: ignore[dict-item]
            }
        finally:
            server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--calls", type=int, default=5000, help="selections of each kind")
    parser.add_argument("--rewards", type=int, default=5000, help="quality.assessed events to fold first")
    parser.add_argument("--policy", choices=["thompson", "epsilon_greedy"], default="thompson")
    args = parser.parse_args()
    result = asyncio.run(bench(args.calls, args.rewards, args.policy))
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>22}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
