"""The agent SDK: validated at the call, buffered, flushed, never dropped silently."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Literal

import pytest

from flywheel_loop.engine.bus import Bus, BusUnavailable
from flywheel_loop.engine.config import Settings, load_settings
from flywheel_loop.engine.embedded import EmbeddedServer
from flywheel_loop.schemas import InvalidEvent, parse_event
from flywheel_loop.sdk.recorder import BufferFull, Recorder, RecorderError, SyncRecorder, events_from_jsonl
from tests.conftest import read_log

TURN = dict(session_id="s1", role="coder", model_id="smollm2", input="write add()", output="def add(a, b): ...")


async def test_async_recorder_publishes_interaction_feedback_and_outcome(bus: Bus, settings: Settings) -> None:
    async with Recorder(settings, url=bus.url, source="agent-x") as rec:
        iid = await rec.record_interaction(**TURN)
        fid = await rec.record_feedback(iid, rating=4, implicit="accepted")
        oid = await rec.record_outcome(iid, compiles=True, tests_passed=3, tests_failed=0)
    stored = await read_log(bus, "raw")
    assert [e.id for e in stored] == [iid, fid, oid]
    assert all(e.correlation_id == iid and e.source == "agent-x" for e in stored)
    assert stored[1].data.rating == 4 and stored[2].data.tests_passed == 3


async def test_several_batches_in_flight_store_every_event_once_in_the_order_recorded(
    bus: Bus, settings: Settings
) -> None:
    async with Recorder(settings, url=bus.url, batch=7, in_flight=5) as rec:
        ids = [await rec.record_interaction(**{**TURN, "input": f"turn {i}"}) for i in range(300)]
        await rec.flush()
        assert rec.published == 300 and rec.pending == 0
    stored = await read_log(bus, "raw")
    assert [e.id for e in stored] == ids
    assert [e.data.input for e in stored] == [f"turn {i}" for i in range(300)]
    with pytest.raises(ValueError, match="in_flight"):
        Recorder(settings, url=bus.url, in_flight=0)


async def test_a_bad_field_raises_at_the_call_naming_the_field(bus: Bus, settings: Settings) -> None:
    async with Recorder(settings, url=bus.url) as rec:
        with pytest.raises(InvalidEvent, match="rating"):
            await rec.record_feedback("01J0000000000000000000000A", rating=9)
        with pytest.raises(InvalidEvent, match="tests_passed"):
            await rec.record_outcome("01J0000000000000000000000A", tests_passed=-1)
    assert await read_log(bus, "raw") == []


def test_sync_recorder_from_a_plain_thread(bus: Bus, settings: Settings) -> None:
    with SyncRecorder(settings, url=bus.url) as rec:
        ids = [rec.record_interaction(**{**TURN, "input": f"task {i}"}) for i in range(300)]
        rec.flush(10)
        assert rec.pending == 0

    async def stored() -> list[str]:
        b = await Bus.connect(settings, bus.url)
        try:
            return [e.id for e in await read_log(b, "raw")]
        finally:
            await b.close()

    assert asyncio.run(stored()) == ids


async def test_no_server_gives_a_clear_error(tmp_path: Path) -> None:
    settings = load_settings(state_dir=tmp_path, nats={"connect_timeout_s": 0.5})
    with pytest.raises(BusUnavailable, match="no NATS URL configured"):
        await Recorder(settings).start()
    with pytest.raises(BusUnavailable, match="cannot reach NATS"):
        await Recorder(settings, url="nats://127.0.0.1:9").start()


async def test_events_survive_an_outage_and_a_full_buffer_raises_instead_of_dropping(tmp_path: Path) -> None:
    server = EmbeddedServer(tmp_path / "nats").start()
    settings = load_settings(state_dir=tmp_path / "state", nats={"url": server.url, "publish_retry_s": 0.5})
    bus = await Bus.connect(settings, server.url)
    await bus.ensure_streams()
    rec = await Recorder(settings, url=server.url, capacity=50, max_block_s=0.3).start()
    try:
        first = [await rec.record_interaction(**TURN) for _ in range(10)]
        await rec.flush(10)
        server.stop()
        during = []
        with pytest.raises(BufferFull):
            for _ in range(100):
                during.append(await rec.record_interaction(**TURN))
        assert len(during) == 50  # the capacity counts what is buffered and in flight
        await asyncio.get_running_loop().run_in_executor(None, server.start)
        await rec.flush(30)
    finally:
        await rec.close()
    stored = [e.id for e in await read_log(bus, "raw")]
    await bus.close()
    server.stop()
    assert stored == first + during  # in order, none lost, none doubled


async def test_close_spills_unsent_events_to_a_replayable_file(tmp_path: Path) -> None:
    server = EmbeddedServer(tmp_path / "nats").start()
    settings = load_settings(state_dir=tmp_path / "state", nats={"url": server.url, "publish_retry_s": 0.2})
    rec = await Recorder(settings, url=server.url).start()
    server.stop()
    ids = [await rec.record_interaction(**TURN) for _ in range(5)]
    with pytest.raises(RecorderError, match="saved to") as info:
        await rec.close(timeout=0.5)
    spill = Path(str(info.value).split("saved to ")[1].split(" — ")[0])
    saved = [parse_event(raw).id for raw in events_from_jsonl(spill.read_bytes())]
    assert saved == ids


async def test_an_idle_recorder_waits_without_polling_and_sends_the_next_event(bus: Bus, settings: Settings) -> None:
    # an agent's recorder sits idle most of the time: it polled every 10 ms (2.5 % of a core); now it waits for an
    # event with no timer, and the first event after the pause is still sent without another to fill its batch
    class CountingEvent(asyncio.Event):
        waits = 0

        async def wait(self) -> Literal[True]:
            CountingEvent.waits += 1
            return await super().wait()

    async with Recorder(settings, url=bus.url, source="idle") as rec:
        assert rec._wakeup is not None
        rec._wakeup = CountingEvent()
        await rec.record_interaction(**TURN)  # wakes the publisher from its first wait
        await rec.flush(10)
        CountingEvent.waits = 0
        await asyncio.sleep(0.5)
        assert CountingEvent.waits <= 1  # polling every 10 ms waited about 50 times
        iid = await rec.record_interaction(**{**TURN, "input": "after the pause"})
        await rec.flush(10)
    stored = await read_log(bus, "raw")
    assert [e.id for e in stored][-1] == iid and len(stored) == 2
