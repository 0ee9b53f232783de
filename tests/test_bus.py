"""The bus against a real nats-server: streams, round trips, dedupe, reconnects."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import nats.errors
import orjson
import pytest
from nats.js.api import AckPolicy, ConsumerConfig

from flywheel_loop.engine.bus import Bus, BusUnavailable, StreamNames, fetch_batch
from flywheel_loop.engine.config import Settings, load_settings
from flywheel_loop.engine.embedded import EmbeddedServer
from flywheel_loop.schemas import CATALOGUE, InteractionRecorded, new_event, parse_event
from tests.conftest import read_log

EXAMPLES = Path(__file__).parent.parent / "schemas" / "examples"


async def test_streams_have_the_configured_guarantees(bus: Bus) -> None:
    names = StreamNames.with_prefix(bus.settings.streams.prefix)
    raw = await bus.js.stream_info(names.raw)
    log = await bus.js.stream_info(names.log)
    assert raw.config.max_age == pytest.approx(30 * 86400)
    assert log.config.deny_delete and log.config.deny_purge
    assert raw.config.duplicate_window == pytest.approx(120)
    await bus.ensure_streams()  # idempotent: a second call changes nothing and does not raise
    assert (await bus.js.stream_info(names.log)).config.deny_purge


async def test_retention_change_upgrades_the_existing_stream(bus: Bus, settings: Settings) -> None:
    changed = settings.model_copy(update={"streams": settings.streams.model_copy(update={"raw_max_age_days": 7})})
    other = await Bus.connect(changed, bus.url)
    await other.ensure_streams()
    info = await bus.js.stream_info(bus.streams.raw)
    await other.close()
    assert info.config.max_age == pytest.approx(7 * 86400)


SEALED = {"interaction.anonymized", "feedback.anonymized", "outcome.anonymized", "attempts.sampled"}


@pytest.mark.parametrize("event_type", sorted(CATALOGUE))
async def test_every_event_type_round_trips_through_jetstream(bus: Bus, event_type: str) -> None:
    path = EXAMPLES / f"{event_type}.json"
    if not path.exists():
        pytest.fail(f"no worked example for {event_type}")
    event = parse_event(path.read_bytes())
    ack = await bus.publish(event)
    assert ack.stream == bus.streams.for_stream(CATALOGUE[event_type].stream)
    stored = await bus.js.get_msg(ack.stream, ack.seq)
    assert stored.headers and stored.headers["Nats-Msg-Id"] == event.id
    assert stored.subject == f"fw.{CATALOGUE[event_type].stream}.{event_type}"
    assert await bus.open_many([stored.data]) == [event]  # personal text sealed on the way in, opened again
    assert parse_event(stored.data).forgotten == (event_type in SEALED)  # without the key: withheld


async def test_a_duplicate_publish_is_stored_once(bus: Bus) -> None:
    event = new_event(InteractionRecorded(session_id="s", role="coder", model_id="m", input="i", output="o"),
                      source="test")
    first = await bus.publish(event)
    second = await bus.publish(event)
    acks = await bus.publish_many([event, event, event])
    assert not first.duplicate and second.duplicate and all(a.duplicate for a in acks)
    assert await bus.last_sequence("raw") == 1


async def test_publish_many_keeps_order_and_stores_each_once(bus: Bus) -> None:
    events = [
        new_event(InteractionRecorded(session_id="s", role="coder", model_id="m", input=str(i), output="o"),
                  source="test")
        for i in range(500)
    ]
    acks = await bus.publish_many(events + events[:100])
    assert [a.seq for a in acks[:500]] == list(range(1, 501))
    assert all(a.duplicate for a in acks[500:])
    assert [e.data.input for e in await read_log(bus, "raw")] == [str(i) for i in range(500)]


async def test_unreachable_server_gives_a_clear_error(tmp_path: Path) -> None:
    settings = load_settings(state_dir=tmp_path, nats={"connect_timeout_s": 0.5})
    with pytest.raises(BusUnavailable, match="cannot reach NATS at nats://127.0.0.1:9"):
        await Bus.connect(settings, "nats://127.0.0.1:9")


async def test_publish_survives_a_server_restart(tmp_path: Path) -> None:
    server = EmbeddedServer(tmp_path / "nats").start()
    settings = load_settings(state_dir=tmp_path, nats={"url": server.url, "publish_retry_s": 30})
    bus = await Bus.connect(settings, server.url)
    await bus.ensure_streams()
    try:
        events = [
            new_event(InteractionRecorded(session_id="s", role="coder", model_id="m", input=str(i), output="o"),
                      source="test")
            for i in range(300)
        ]
        await bus.publish_many(events[:100])
        server.stop()
        def restart_later() -> None:
            time.sleep(1)
            server.start()

        restart = asyncio.get_running_loop().run_in_executor(None, restart_later)
        await bus.publish_many(events[100:])  # retried through the outage
        await restart
        stored = await read_log(bus, "raw")
        assert sorted(e.data.input for e in stored) == sorted(str(i) for i in range(300))
        assert len({e.id for e in stored}) == 300
    finally:
        await bus.close()
        server.stop()


async def test_wire_format_is_orjson_of_the_envelope(bus: Bus) -> None:
    event = new_event(InteractionRecorded(session_id="s", role="coder", model_id="m", input="i", output="o"),
                      source="test")
    ack = await bus.publish(event)
    raw = orjson.loads((await bus.js.get_msg(ack.stream, ack.seq)).data)
    assert set(raw) == {"id", "type", "schema_version", "time", "source", "causation_id", "correlation_id", "data"}
    assert raw["correlation_id"] == event.id  # an interaction correlates with itself


async def test_fetch_batch_takes_what_is_there_in_order_then_waits_for_more(bus: Bus) -> None:
    def turn(i: int) -> object:
        return new_event(InteractionRecorded(session_id="s", role="coder", model_id="m", input=f"turn {i}",
                                                output="ok"),
                         source="test")

    events = [turn(i) for i in range(25)]
    await bus.publish_many(events)  # type: ignore[arg-type]
    await bus.js.add_consumer(bus.streams.raw, ConsumerConfig(durable_name="fetcher", ack_policy=AckPolicy.EXPLICIT))
    sub = await bus.js.pull_subscribe_bind(durable="fetcher", stream=bus.streams.raw)
    got = []
    for size in (10, 10, 5):
        msgs = await fetch_batch(sub, 10, timeout=2.0)
        assert len(msgs) == size
        for msg in msgs:
            await msg.ack()
        got += [parse_event(m.data).id for m in msgs]
    assert got == [e.id for e in events]  # each once, in the stream's order
    started = time.monotonic()
    with pytest.raises(nats.errors.TimeoutError):
        await fetch_batch(sub, 10, timeout=0.5)  # nothing left: it waits its timeout, then says so
    assert time.monotonic() - started >= 0.4
    # a fetch that is waiting hands over what is published meanwhile
    waiting = asyncio.create_task(fetch_batch(sub, 10, timeout=10.0))
    await asyncio.sleep(0.3)
    late = [turn(i) for i in range(25, 28)]
    await bus.publish_many(late)  # type: ignore[arg-type]
    msgs = await waiting
    for msg in msgs:
        await msg.ack()
    while len(msgs) < 3:  # the first may come alone; the rest follow with the next call
        more = await fetch_batch(sub, 10, timeout=2.0)
        for msg in more:
            await msg.ack()
        msgs += more
    assert [parse_event(m.data).id for m in msgs] == [e.id for e in late]


async def test_fetch_batch_leaves_no_status_for_the_next_call(bus: Bus) -> None:
    # a call that found nothing has read the server's end of its waiting request (the 408): left
    # unread, the next call would take it for the end of its own request and return early, empty
    await bus.js.add_consumer(bus.streams.raw, ConsumerConfig(durable_name="idle", ack_policy=AckPolicy.EXPLICIT))
    sub = await bus.js.pull_subscribe_bind(durable="idle", stream=bus.streams.raw)
    left_behind = 0
    for _ in range(20):
        with pytest.raises(nats.errors.TimeoutError):
            await fetch_batch(sub, 10, timeout=0.05)
        await asyncio.sleep(0.05)  # time for a late status to arrive
        left_behind += sub._sub._pending_queue.qsize()
    assert left_behind == 0


async def test_a_follow_up_whose_consumer_went_away_while_idle_subscribes_again(bus: Bus, tmp_path: Path) -> None:
    import sqlite3

    from flywheel_loop.engine.projection import Projection, ProjectionRunner

    class Seen(Projection):
        name = "seen"
        consumes = ("interaction.recorded",)
        tables = "CREATE TABLE IF NOT EXISTS seen (input TEXT NOT NULL);"

        def apply(self, db: sqlite3.Connection, event: Any, seq: int) -> None:
            db.execute("INSERT INTO seen VALUES (?)", (event.data.input,))

    def turn(i: int) -> Any:
        return new_event(InteractionRecorded(session_id="s", role="coder", model_id="m", input=f"turn {i}",
                                             output="ok"), source="test")

    runner = ProjectionRunner(bus, Seen(), tmp_path / "seen.sqlite")
    await bus.publish_many([turn(i) for i in range(3)])
    assert await runner.follow_up() == 3
    # idle past its inactive threshold, the consumer is deleted by the server (as while a training run holds
    # the CPU for minutes): the next follow-up subscribes again from the stored position, and raises nothing
    await bus.js.delete_consumer(runner.stream_name, runner._sub._consumer)
    await bus.publish_many([turn(i) for i in range(3, 5)])
    assert await runner.follow_up() == 5
    with sqlite3.connect(runner.store.path) as db:
        assert [r[0] for r in db.execute("SELECT input FROM seen")] == [f"turn {i}" for i in range(5)]
    runner.close()
