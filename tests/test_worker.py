"""The worker runtime: exactly-once effects through kills, restarts and bad input."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from flywheel_loop.engine.bus import Bus
from flywheel_loop.engine.config import Settings
from flywheel_loop.engine.embedded import EmbeddedServer
from flywheel_loop.engine.hookspecs import hookimpl
from flywheel_loop.engine.processor import ProcessContext, Processor
from flywheel_loop.engine.replay import differences, rebuild
from flywheel_loop.schemas import (
    Event,
    InteractionAnonymized,
    InteractionRecorded,
    InvalidEvent,
    new_event,
    parse_event,
)
from tests.conftest import RunningEngine, read_log, wait_for
from tests.counting_plugin import Counted, CountingPlugin, counts

ROOT = Path(__file__).parent.parent


def interaction(i: int) -> Event[Any]:
    return new_event(
        InteractionRecorded(session_id=f"s{i % 7}", role="coder", model_id="m", input=f"task {i}", output="ok"),
        source="test",
    )


async def publish_interactions(bus: Bus, n: int) -> list[str]:
    events = [interaction(i) for i in range(n)]
    for start in range(0, n, 1000):
        await bus.publish_many(events[start:start + 1000])
    return [e.id for e in events]


async def test_outputs_have_derived_ids_and_causation(bus: Bus, engine_with: Callable[..., RunningEngine]) -> None:
    ids = await publish_interactions(bus, 20)
    async with engine_with(CountingPlugin(), builtins=False) as running:
        counted = running.projection("counted")
        await wait_for(lambda: counted.store.position().applied == 20)
    out = await read_log(bus, "log", "interaction.anonymized")
    assert sorted(e.causation_id for e in out) == sorted(ids)
    assert all(e.correlation_id == e.causation_id for e in out)
    assert all(e.source == "pass_through" for e in out)
    assert all(e.id[:10] == e.causation_id[:10] for e in out)  # derived ids sort beside their cause


async def test_worker_killed_mid_batch_loses_nothing_and_doubles_nothing(
    bus: Bus, settings: Settings, nats_server: EmbeddedServer
) -> None:
    n = 10_000
    await publish_interactions(bus, n)
    state = settings.state_dir
    store = state / "projections" / "counted.sqlite"
    cmd = [sys.executable, "-m", "tests.counting_plugin", nats_server.url, str(state)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    worker = subprocess.Popen(cmd, cwd=ROOT, env=env)
    try:
        # Kill it hard once it is well into the stream, between or inside batches.
        await wait_for(lambda: store.exists() and counts(store)[0] >= 1500, timeout=120)
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        killed_at = counts(store)[0]
        assert killed_at < n, "the worker finished before it could be killed"
        worker = subprocess.Popen(cmd, cwd=ROOT, env=env)
        await wait_for(lambda: counts(store)[0] >= n, timeout=180)
        await asyncio.sleep(1.0)  # anything doubled would arrive now
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
    total, distinct, rows = counts(store)
    assert (total, distinct, rows) == (n, n, n)
    out = await bus.js.stream_info(bus.streams.log, subjects_filter="fw.log.interaction.anonymized")
    assert sum(out.state.subjects.values()) == n  # the log holds each output exactly once


async def test_nats_restart_mid_stream_loses_nothing(
    bus: Bus, nats_server: EmbeddedServer, engine_with: Callable[..., RunningEngine]
) -> None:
    n = 3000
    async with engine_with(CountingPlugin(), builtins=False) as running:
        counted = running.projection("counted")
        await publish_interactions(bus, n // 2)
        await wait_for(lambda: counted.store.position().applied > 0, timeout=60)
        nats_server.stop()  # everything connected sees the server go away mid-stream
        await asyncio.sleep(0.5)
        await asyncio.get_running_loop().run_in_executor(None, nats_server.start)
        events = [interaction(i) for i in range(n // 2, n)]
        await bus.publish_many(events)
        await wait_for(lambda: counted.store.position().applied >= n, timeout=120)
    total, distinct, _ = counts(counted.store.path)
    assert (total, distinct) == (n, n)


async def test_replay_rebuilds_a_projection_identical_to_the_live_one(
    bus: Bus, settings: Settings, engine_with: Callable[..., RunningEngine], tmp_path: Path
) -> None:
    await publish_interactions(bus, 500)
    async with engine_with(CountingPlugin(), only={"pass_through", "counted", "log_index"}) as running:
        counted = running.projection("counted")
        await wait_for(lambda: counted.store.position().applied == 500)
        for r in running.engine.runners:
            await r.catch_up()
        live_index = running.projection("log_index").store.path
    rebuilt = tmp_path / "rebuilt.sqlite"
    await rebuild(bus, Counted(), rebuilt)
    assert differences(counted.store.path, rebuilt) == []
    from flywheel_loop.plugins.insight.log_index import LogIndex

    rebuilt_index = tmp_path / "index.sqlite"
    await rebuild(bus, LogIndex(), rebuilt_index)
    assert differences(live_index, rebuilt_index) == []
    # up to a position: only the events before it
    partial = tmp_path / "partial.sqlite"
    await rebuild(bus, Counted(), partial, until_seq=100)
    assert counts(partial)[0] == 100


class Flaky:
    """Raises on the first attempts for some inputs, always for one."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    def handle(self, event: Event[Any], ctx: ProcessContext) -> list[InteractionAnonymized]:
        self.calls[event.id] = self.calls.get(event.id, 0) + 1
        if event.data.input == "always fails":
            raise RuntimeError("this plugin cannot handle it")
        if event.data.input.startswith("flaky") and ctx.attempt < 3:
            raise TimeoutError("a passing failure")
        return [InteractionAnonymized(interaction_id=event.id, interaction=event.data)]

    @hookimpl
    def register_processors(self, register: Callable[[Processor], None], settings: Settings) -> None:
        register(Processor("flaky", ("interaction.recorded",), self.handle))


async def test_a_raising_plugin_is_retried_with_backoff_then_rejected(
    bus: Bus, engine_with: Callable[..., RunningEngine]
) -> None:
    flaky = Flaky()
    inputs = ["fine", "flaky one", "always fails", "flaky two", "fine again"]
    events = [new_event(InteractionRecorded(session_id="s", role="coder", model_id="m", input=t, output="o"),
                        source="test") for t in inputs]
    await bus.publish_many(events)
    async with engine_with(flaky, CountingPlugin(), builtins=False):
        await wait_for(lambda: len([e for e in flaky.calls.values()]) == 5 and max(flaky.calls.values()) >= 5,
                       timeout=60)
        await wait_for(lambda: read_log(bus, "log", "event.rejected"), timeout=30)
        await asyncio.sleep(0.5)
    outputs = await read_log(bus, "log", "interaction.anonymized")
    by_source: dict[str, set[str]] = {}
    for e in outputs:
        by_source.setdefault(e.source, set()).add(e.data.interaction.input)
    # the other plugin on the same input is unaffected; the flaky ones succeed on attempt 3
    assert by_source["pass_through"] == set(inputs)
    assert by_source["flaky"] == set(inputs) - {"always fails"}
    rejected = await read_log(bus, "log", "event.rejected")
    assert len(rejected) == 1
    r = rejected[0].data
    assert r.processor == "flaky" and r.attempts == 5
    assert "RuntimeError: this plugin cannot handle it" in r.reason
    assert rejected[0].data.original_id == events[2].id
    assert flaky.calls[events[2].id] == 5


def _valid_dict(i: int) -> dict[str, Any]:
    return orjson.loads(interaction(i).to_bytes())


def _is_invalid(blob: bytes) -> bool:
    try:
        event = parse_event(blob)
    except InvalidEvent:
        return True
    return event.type != "interaction.recorded"


def _mutate(base: dict[str, Any], path: list[str], value: Any) -> bytes:
    target = base
    for key in path[:-1]:
        target = target[key]
    if value is _DROP:
        target.pop(path[-1], None)
    else:
        target[path[-1]] = value
    return orjson.dumps(base)


_DROP = object()
_int64 = st.integers(-(2**63), 2**63 - 1)  # orjson's range
_fields = st.sampled_from([
    ["id"], ["type"], ["time"], ["source"], ["schema_version"], ["data"], ["data", "role"], ["data", "input"],
    ["data", "session_id"], ["data", "tokens"], ["data", "cost_usd"], ["data", "complexity"], ["data", "unknown"],
    ["unknown"],
])
_values = st.one_of(
    st.just(_DROP), st.none(), _int64, st.floats(allow_nan=False), st.text(max_size=20),
    st.lists(_int64, max_size=3), st.dictionaries(st.text(max_size=5), _int64, max_size=2),
)
malformed = st.one_of(
    st.binary(max_size=64),
    st.text(max_size=64).map(str.encode),
    st.builds(lambda f, v: _mutate(_valid_dict(0), f, v), _fields, _values),
    st.recursive(st.none() | st.booleans() | _int64 | st.text(max_size=8),
                 lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                 max_leaves=6).map(orjson.dumps),
).filter(_is_invalid)


# Two runs: Hypothesis's first example is the simplest one; the second is varied.
@hsettings(max_examples=2, deadline=None, phases=[Phase.generate],
           suppress_health_check=[HealthCheck.data_too_large, HealthCheck.too_slow, HealthCheck.large_base_example,
                                  HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much])
@given(kinds=st.lists(malformed, min_size=100, max_size=100))
def test_malformed_messages_are_rejected_and_valid_ones_processed(
    kinds: list[bytes], tmp_path_factory: Any
) -> None:
    # 100 drawn shapes (Hypothesis caps how much one example may hold), each sent 10 times
    # under its own message id: 1,000 malformed messages.
    bad = [kinds[i % 100] for i in range(1000)]
    asyncio.run(_malformed_run(bad, tmp_path_factory.mktemp("malformed")))


async def _malformed_run(bad: list[bytes], tmp: Path) -> None:
    from flywheel_loop.engine.app import Engine
    from flywheel_loop.engine.config import load_settings
    from flywheel_loop.engine.plugin_host import PluginHost

    with EmbeddedServer(tmp / "nats") as server:
        settings = load_settings(state_dir=tmp / "state", nats={"url": server.url},
                                 worker={"fetch_timeout_s": 0.2})
        bus = await Bus.connect(settings, server.url)
        await bus.ensure_streams()
        valid = [interaction(i) for i in range(1000)]
        # interleave: bad, valid, bad, valid ... each bad one with its own message id
        for i in range(1000):
            await bus.nc.publish("fw.raw.interaction.recorded", bad[i], headers={"Nats-Msg-Id": f"bad-{i}"})
            await bus.publish(valid[i]) if i % 100 == 0 else await bus.nc.publish(
                valid[i].subject, valid[i].to_bytes(), headers={"Nats-Msg-Id": valid[i].id})
        await bus.nc.flush()
        await wait_for(lambda: _stored(bus, 2000), timeout=30)
        host = PluginHost(settings, load_entry_points=False)
        host.register(CountingPlugin(), "counting")
        async with RunningEngine(Engine(bus, host)) as running:
            counted = running.projection("counted")
            await wait_for(lambda: counted.store.position().applied == 1000, timeout=120)
            info = await wait_for(lambda: _consumer_done(bus), timeout=60)
            assert info.num_redelivered == 0
        rejected = await read_log(bus, "log", "event.rejected")
        await bus.close()
    assert len(rejected) == 1000
    assert all(r.data.reason.strip() and r.data.processor == "pass_through" for r in rejected)
    assert sorted(r.data.sequence for r in rejected) == list(range(1, 2000, 2))


async def _stored(bus: Bus, n: int) -> bool:
    return await bus.last_sequence("raw") == n


async def _consumer_done(bus: Bus) -> Any:
    info = await bus.js.consumer_info(bus.streams.raw, "pass_through")
    return info if info.num_pending == 0 and info.num_ack_pending == 0 else None


class Slow:
    """An async step that takes longer than the consumer's ack wait."""

    def __init__(self) -> None:
        self.calls = 0

    async def handle(self, event: Event[Any], ctx: ProcessContext) -> list[InteractionAnonymized]:
        self.calls += 1
        await asyncio.sleep(2.5)
        return [InteractionAnonymized(interaction_id=event.id, interaction=event.data)]

    @hookimpl
    def register_processors(self, register: Callable[[Processor], None], settings: Settings) -> None:
        register(Processor("slow", ("interaction.recorded",), self.handle, batch=1))


async def test_a_long_step_is_not_redelivered_while_it_runs(
    bus: Bus, settings: Settings, engine_with: Callable[..., RunningEngine]
) -> None:
    slow = Slow()
    running = engine_with(slow, builtins=False)
    running.engine.bus.settings.worker.ack_wait_s = 1.0  # shorter than the step
    await bus.publish(interaction(1))
    async with running:
        await wait_for(lambda: read_log(bus, "log", "interaction.anonymized"), timeout=30)
        await asyncio.sleep(1.5)
    assert slow.calls == 1
