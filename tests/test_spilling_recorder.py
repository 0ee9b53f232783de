"""The recorder a server uses (the gateway's): never waits on the bus, spills while it is down, publishes later,
each event stored once."""

from __future__ import annotations

from pathlib import Path

from flywheel_loop.engine.bus import Bus
from flywheel_loop.engine.config import Settings, load_settings
from flywheel_loop.engine.embedded import free_port
from flywheel_loop.schemas import InteractionRecorded
from flywheel_loop.sdk.recorder import SpillingRecorder
from tests.conftest import read_log

TURN = dict(session_id="s1", role="coder", model_id="coder-v1", input="write add()", output="def add(a, b): ...")


async def test_with_no_bus_at_all_recording_returns_at_once_and_spills_on_close(tmp_path: Path) -> None:
    settings = load_settings(state_dir=tmp_path, nats={"url": f"nats://127.0.0.1:{free_port()}",
                                                       "connect_timeout_s": 0.2})
    recorder = await SpillingRecorder(settings, spill_after_s=0.2, capacity=100).start()
    ids = [await recorder.record(InteractionRecorded(**{**TURN, "input": f"task {i}"})) for i in range(250)]
    assert recorder.spilled >= 200  # over capacity: to disk, not a wait
    await recorder.close(timeout=0.5)
    lines = b"".join(p.read_bytes() for p in recorder.spill_files()).splitlines()
    assert len(lines) == len(ids) == 250


async def test_spilled_records_are_published_once_when_the_bus_is_back(bus: Bus, settings: Settings) -> None:
    down = settings.model_copy(update={"nats": settings.nats.model_copy(
        update={"url": f"nats://127.0.0.1:{free_port()}", "connect_timeout_s": 0.2})})
    offline = await SpillingRecorder(down, spill_after_s=0.1).start()
    ids = [await offline.record(InteractionRecorded(**{**TURN, "input": f"task {i}"})) for i in range(30)]
    await offline.close(timeout=0.3)
    assert len(offline.spill_files()) >= 1
    online = await SpillingRecorder(settings).start()  # the same spill folder, the bus reachable
    later = await online.record(InteractionRecorded(**TURN))
    await online.flush(30)
    assert online.spill_files() == []
    await online.close()
    stored = [e.id for e in await read_log(bus, "raw")]
    assert sorted(stored) == sorted([*ids, later]) and len(set(stored)) == len(stored)
