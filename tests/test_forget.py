"""``flywheel forget``: a session's raw data erased, its text on the immutable log shredded (its keys
destroyed), every projection, store and dataset without it, nothing of it in any file of the NATS store or
the state folder, the other session intact, and a replay of the log reaching the same state."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats.js.errors
import orjson
import pytest
from typer.testing import CliRunner

from flywheel_loop.engine.bus import Bus
from flywheel_loop.engine.config import Settings
from flywheel_loop.engine.embedded import EmbeddedServer
from flywheel_loop.engine.replay import differences, rebuild
from flywheel_loop.plugins.curation.builder import rebuild_dataset
from flywheel_loop.plugins.curation.settings import CurationConfig
from flywheel_loop.plugins.curation.vectors import VectorStore, shared_embedder
from flywheel_loop.plugins.insight.scores import Scores
from flywheel_loop.plugins.insight.stats import Anonymization
from flywheel_loop.plugins.privacy.forgetting import forget, pseudonym
from flywheel_loop.plugins.shared.training_requests import request_training
from flywheel_loop.schemas import (
    Context,
    FeedbackGiven,
    InteractionRecorded,
    OutcomeObserved,
    new_event,
    parse_event,
)
from tests.conftest import read_log, wait_for

ENGINE = {"anonymizer", "scoring", "embedder", "dataset_builder", "scores"}
FORGOTTEN_SESSION = "laptop-of-alice-session-1"
KEPT_SESSION = "laptop-of-bob-session-2"
# words that survive anonymization, so they reach the log, the evidence store and the dataset
ALICE = [
    "Write the aardvark ledger reconciliation function for the quarterly report.",
    "Explain how the aardvark scheduler picks the next job in its queue.",
    "Fix the aardvark parser so that it accepts trailing commas in lists.",
]
BOB = [
    "Write a Python function that reverses a string.",
    "Implement binary search over a sorted list of integers.",
    "Write a SQL query that lists the ten most recent orders.",
    "Implement an LRU cache with a fixed capacity.",
]
MARK = "aardvark"
#: everything of the forgotten session that reached the bus: none of it may be left in any file afterwards
PLANTED = [MARK, FORGOTTEN_SESSION, f"user-of-{FORGOTTEN_SESSION}", *ALICE, "thanks, the aardvark works"]
TESTS = "def test_reverse():\n    assert reverse('abc') == 'cba'\n"


@pytest.fixture
def settings(settings_with: Callable[..., Settings]) -> Settings:
    return settings_with(curation={
        "min_reward": 0.0,  # every scored interaction is eligible: the dataset holds both sessions
        "dataset": {"min_examples": 2, "forgetting_share": 0.0, "validation_share": 0.0, "rehearsal_share": 0.0},
        "embedding": {"flush_s": 0.2},
    })


async def _record(bus: Bus) -> dict[str, list[str]]:
    """Both sessions' interactions (with outcomes, one with feedback) on the raw stream."""
    ids: dict[str, list[str]] = {FORGOTTEN_SESSION: [], KEPT_SESSION: []}
    for session, prompts in ((FORGOTTEN_SESSION, ALICE), (KEPT_SESSION, BOB)):
        for n, prompt in enumerate(prompts):
            tests = TESTS if session == KEPT_SESSION and n == 0 else None
            raw = new_event(
                InteractionRecorded(session_id=session, user_id=f"user-of-{session}", role="coder", model_id="m",
                                    input=prompt, output=f"def solution_{n}():\n    return {n}",
                                    context=Context(tests=tests), domain="web", complexity="moderate"),
                source="agent",
            )
            await bus.publish(raw)
            await bus.publish(new_event(OutcomeObserved(interaction_id=raw.id, compiles=True, tests_passed=2,
                                                        tests_failed=0), source="agent", cause=raw))
            if n == 1:
                word = MARK if session == FORGOTTEN_SESSION else "search"
                await bus.publish(new_event(FeedbackGiven(interaction_id=raw.id, rating=5,
                                                          comment=f"thanks, the {word} works"),
                                            source="agent", cause=raw))
            ids[session].append(raw.id)
    return ids


async def _idle(bus: Bus, consumer: str, stream: str) -> bool:
    try:
        info = await bus.js.consumer_info(bus.streams.for_stream(stream), consumer)
    except nats.js.errors.NotFoundError:
        return False  # the engine has not created it yet
    return info.num_pending == 0 and info.num_ack_pending == 0


def _rows(folder: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for p in sorted(folder.glob("*.jsonl")) for line in p.read_bytes().splitlines()]


def _blob(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file())


def _files(*folders: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for folder in folders for p in folder.rglob("*") if p.is_file()}


def _holding(files: dict[Path, bytes], needles: list[bytes]) -> list[tuple[str, bytes]]:
    return [(str(p), n) for p, data in files.items() for n in needles if n in data]


def _score_ids(path: Path) -> set[str]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {r[0] for r in db.execute("SELECT interaction_id FROM scores")}
    finally:
        db.close()


async def test_forget_leaves_no_trace_of_the_session_and_a_replay_agrees(
    bus: Bus, engine_with: Any, settings: Settings, nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    ids = await _record(bus)
    alice, bob = set(ids[FORGOTTEN_SESSION]), set(ids[KEPT_SESSION])
    state = settings.state_dir
    scores_path = state / "projections" / "scores.sqlite"
    evidence_path = state / "processors" / "scoring" / "state.sqlite"
    key = shared_embedder(CurationConfig.of(settings).embedding, settings.state_dir).key
    store = VectorStore((state / "vectors"), key)

    async with engine_with(only=ENGINE):
        async def scored() -> bool:
            return (await _idle(bus, "anonymizer", "raw") and await _idle(bus, "scoring", "log")
                    and scores_path.exists() and len(_score_ids(scores_path)) == 7)

        await wait_for(scored, timeout=60)
        request = await request_training(bus, "coder")
        [built] = await wait_for(lambda: read_log(bus, "log", "dataset.built"), timeout=60)
        await wait_for(lambda: store.count() == 7, timeout=30)
        vectors = store.get(sorted(alice | bob))
        old = Path(built.data.path)
        assert {r["id"] for r in _rows(old)} == alice | bob and MARK.encode() in _blob(old)  # it was there
        assert [r["tests"] for r in _rows(old) if r["id"] == ids[KEPT_SESSION][0]] == [TESTS]

        # the log holds no plaintext of either session: their text is sealed under their interactions' keys
        log_messages = [data async for _, data in bus.scan("log", ["fw.log.>"])]
        log_bytes = b"".join(log_messages)
        assert not [p for p in [*PLANTED, *BOB] if p.encode() in log_bytes]
        keys = await bus.keys.store.fetch(sorted(alice | bob))
        assert set(keys) == alice | bob and all(keys.values())
        nats_files = _files(nats_server.data_dir / "jetstream")
        assert all(_holding(nats_files, [keys[i]]) for i in alice)  # the key bytes are stored, so findable
        anonymization_before = tmp_path / "anonymization-before.sqlite"
        await rebuild(bus, Anonymization(), anonymization_before)

        # one interaction's raw message has expired already: the log still knows it by the keyed hash
        expired = ids[FORGOTTEN_SESSION][2]
        async for seq, data in bus.scan("raw", ["fw.raw.interaction.recorded"]):
            if expired.encode() in data:
                await bus.js.delete_msg(bus.streams.raw, seq)
        report = await forget(settings, bus, session=FORGOTTEN_SESSION, reason="erasure request",
                              requested_by="tester")
        assert report.raw_deleted == 2 + 3 + 1  # interactions, their outcomes, the feedback
        assert set(report.interaction_ids) == alice
        assert report.counts["feedback"] == 1 and report.counts["outcomes"] == 3 and report.counts["scores"] >= 3
        assert report.counts["keys"] == report.keys_destroyed == 3  # one data key per interaction
        assert report.datasets == [built.data.dataset_hash]

        [superseded] = await wait_for(lambda: read_log(bus, "log", "dataset.superseded"), timeout=60)
        await wait_for(lambda: _score_ids(scores_path) == bob, timeout=30)
        await wait_for(lambda: store.count() == 4, timeout=30)

    # the raw stream: nothing of the session is left, in the messages or in the stream's files
    raw = await read_log(bus, "raw")
    assert len(raw) == 4 + 4 + 1  # the kept session's interactions, outcomes, feedback
    assert all(getattr(e.data, "session_id", KEPT_SESSION) == KEPT_SESSION for e in raw)
    assert not alice & ({e.id for e in raw} | {getattr(e.data, "interaction_id", "") for e in raw})
    raw_files = b"".join(p.read_bytes() for p in (nats_server.data_dir / "jetstream").rglob("*")
                         if p.is_file() and bus.streams.raw in str(p))
    assert raw_files and FORGOTTEN_SESSION.encode() not in raw_files
    assert MARK.encode() not in raw_files
    assert KEPT_SESSION.encode() in raw_files

    # shredded: the keys are gone from the store and from its files; what the log held of the session, in the
    # stream or in any copy of its messages made before, opens only as forgotten, while the rest opens whole
    assert await bus.keys.store.fetch(sorted(alice | bob)) == {**{i: None for i in alice}, **{i: keys[i] for i in bob}}
    fresh = await Bus.connect(settings, bus.url)  # another process: nothing cached
    try:
        reopened = await fresh.open_many(log_messages)
    finally:
        await fresh.close()
    about = [e for e in reopened if e.type.endswith(".anonymized")]
    subject_of = {e.id: getattr(e.data, "interaction_id", None) or getattr(
        getattr(e.data, "feedback", None) or getattr(e.data, "outcome", None), "interaction_id", None) for e in about}
    sealed = {e.id for e in map(parse_event, log_messages) if e.sealed is not None}  # those with personal text
    assert {e.id for e in about if e.forgotten} == {eid for eid, iid in subject_of.items() if iid in alice} & sealed
    assert len({eid for eid, iid in subject_of.items() if iid in alice} & sealed) == 3 + 1  # interactions, feedback
    assert [e.data.interaction.input for e in about if e.type == "interaction.anonymized" and not e.forgotten] == BOB
    assert all(e.data.interaction.input == "" for e in about if e.type == "interaction.anonymized" and e.forgotten)
    # nothing of the session in any file: the NATS store (log, raw, keys) and the state folder
    everything = _files(nats_server.data_dir / "jetstream", settings.state_dir)
    assert not _holding(everything, [p.encode() for p in PLANTED] + [keys[i] for i in alice])
    assert _holding(everything, [b"binary search"]) and all(_holding(everything, [keys[i]]) for i in bob)

    # the announcement names the subject by its keyed hash only
    [announced] = await read_log(bus, "log", "data.forgotten")
    f = announced.data
    assert f.subject == "session" and f.subject_hash == pseudonym(settings, FORGOTTEN_SESSION)
    assert set(f.interaction_ids) == alice and f.reason == "erasure request" and f.requested_by == "tester"
    assert f.counts["keys_destroyed"] == 3
    assert FORGOTTEN_SESSION.encode() not in announced.to_bytes()

    # projections, evidence and vectors: the kept session only
    assert _score_ids(scores_path) == bob
    assert set(store.get(sorted(alice | bob))) == bob
    lance_files = b"".join(p.read_bytes() for p in (state / "vectors").rglob("*") if p.is_file())
    assert all(vectors[i].tobytes() in lance_files for i in bob)  # stored as raw floats, so findable
    assert not any(vectors[i].tobytes() in lance_files for i in alice)  # compacted away, not just marked
    evidence_bytes = b"".join(p.read_bytes() for p in evidence_path.parent.glob("state.sqlite*"))
    assert MARK.encode() not in evidence_bytes and b"binary search" in evidence_bytes
    db = sqlite3.connect(evidence_path)
    assert {r[0] for r in db.execute("SELECT interaction_id FROM interactions")} == bob
    assert not {r[0] for r in db.execute("SELECT interaction_id FROM evidence")} & alice
    db.close()

    # the dataset: rebuilt without the session, the old one superseded and its folder gone
    s = superseded.data
    assert s.old_hash == built.data.dataset_hash and s.new_hash and s.new_hash != s.old_hash
    assert s.forgotten_id == announced.id and s.log_position == request.data.log_position
    assert not old.exists()
    new = Path(s.path or "")
    assert {r["id"] for r in _rows(new)} == bob
    assert MARK.encode() not in _blob(new) and b"binary search" in _blob(new)
    assert not set(s.lineage) & set(f.event_ids)
    assert [r["tests"] for r in _rows(new) if r["id"] == ids[KEPT_SESSION][0]] == [TESTS]

    # a replay from the log reaches the same state; what is not personal (scrub counts) rebuilds as before
    anonymization_after = tmp_path / "anonymization-after.sqlite"
    await rebuild(bus, Anonymization(), anonymization_after)
    assert differences(anonymization_before, anonymization_after) == []
    replayed = tmp_path / "replayed-scores.sqlite"
    await rebuild(bus, Scores(), replayed)
    assert differences(scores_path, replayed) == [] and _score_ids(replayed) == bob
    digest, path = await rebuild_dataset(settings, bus, "coder", request.data.log_position)
    assert digest == s.new_hash and _blob(path) == _blob(new)

    # the other projections that keep a row per interaction keep none of the forgotten ones
    from flywheel_loop.plugins.insight.bandit_state import BanditStateProjection
    from flywheel_loop.plugins.insight.dashboard_view import DashboardView

    for projection, table in ((BanditStateProjection(), "credits"), (DashboardView(), "assessments")):
        path = tmp_path / f"replayed-{projection.name}.sqlite"
        await rebuild(bus, projection, path)
        db = sqlite3.connect(path)
        kept = {r[0] for r in db.execute(f"SELECT interaction_id FROM {table}")}
        db.close()
        assert kept == bob, projection.name

    # forgetting again finds nothing new and announces nothing
    again = await forget(settings, bus, session=FORGOTTEN_SESSION)
    assert again.nothing_new and not again.announced
    assert len(await read_log(bus, "log", "data.forgotten")) == 1


def test_the_cli_forgets_a_user_and_refuses_unclear_requests(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flywheel_loop.engine.cli import app

    async def with_bus(step: Callable[[Bus], Any]) -> None:
        bus = await Bus.connect(settings, settings.nats.url or "")
        try:
            await bus.ensure_streams()
            await step(bus)
        finally:
            await bus.close()

    async def publish(bus: Bus) -> None:
        for user in ("carol", "dave"):
            raw = new_event(InteractionRecorded(session_id=f"s-{user}", user_id=user, role="coder", model_id="m",
                                                input="q", output="a"), source="agent")
            await bus.publish(raw)
            await bus.publish(new_event(OutcomeObserved(interaction_id=raw.id, compiles=True),
                                        source="agent", cause=raw))

    async def check(bus: Bus) -> None:
        raw = await read_log(bus, "raw")
        assert len(raw) == 2 and {getattr(e.data, "user_id", "dave") for e in raw} == {"dave"}
        [event] = await read_log(bus, "log", "data.forgotten")
        assert event.data.subject == "user" and event.data.subject_hash == pseudonym(settings, "carol")
        assert event.data.counts["raw_deleted"] == 2 and b"carol" not in event.to_bytes()

    monkeypatch.setenv("FLYWHEEL_NATS__URL", settings.nats.url or "")
    monkeypatch.setenv("FLYWHEEL_STATE_DIR", str(settings.state_dir))
    runner = CliRunner()
    both = runner.invoke(app, ["forget", "--session", "a", "--user", "b", "--yes"])
    assert both.exit_code == 2 and "exactly one of --session ID or --user ID" in both.output
    nobody = runner.invoke(app, ["forget", "--user", "nobody", "--yes"])
    assert nobody.exit_code == 0 and "nothing to forget" in nobody.output

    asyncio.run(with_bus(publish))
    dry = runner.invoke(app, ["forget", "--user", "carol", "--dry-run"])
    assert dry.exit_code == 0 and "dry run" in dry.output
    done = runner.invoke(app, ["forget", "--user", "carol", "--yes", "--reason", "gdpr"])
    assert done.exit_code == 0, done.output
    assert "erased 2 raw messages" in done.output and "data.forgotten" in done.output
    asyncio.run(with_bus(check))


def test_a_large_subject_is_announced_in_parts_within_the_event_limits() -> None:
    from flywheel_loop.plugins.privacy.forgetting import _parts
    from flywheel_loop.schemas import DataForgotten, new_id
    from flywheel_loop.schemas.events import FORGOTTEN_IDS_MAX

    interactions = sorted(new_id() for _ in range(FORGOTTEN_IDS_MAX + 10))
    events_of = {iid: [new_id(), new_id()] for iid in interactions}
    parts = _parts(interactions, events_of)
    assert len(parts) == 3
    assert [i for ids, _ in parts for i in ids] == interactions  # every interaction, once, in order
    assert sorted(e for _, events in parts for e in events) == sorted(e for v in events_of.values() for e in v)
    for ids, events in parts:
        event = new_event(DataForgotten(subject="user", subject_hash="anon-0123456789abcdef", interaction_ids=ids,
                                        event_ids=events), source="test")
        assert len(event.to_bytes()) < 1024 * 1024  # each part fits one NATS message
