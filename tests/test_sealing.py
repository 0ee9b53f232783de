"""Crypto-shredding: personal text sealed on the log under per-interaction keys, opened by the engine, shredded
by destroying a key; the key stores (JetStream KV and a folder); what the engine does when a key store is
unreachable. Against real NATS servers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from flywheel_loop.engine.bus import Bus
from flywheel_loop.engine.config import Settings
from flywheel_loop.engine.embedded import EmbeddedServer
from flywheel_loop.engine.hookspecs import hookimpl
from flywheel_loop.engine.keys import FileKeyStore, KeyStoreError, KeyStoreUnavailable, SubjectForgotten
from flywheel_loop.engine.processor import ProcessContext, Processor
from flywheel_loop.engine.projection import Projection
from flywheel_loop.schemas import (
    CATALOGUE,
    Context,
    Event,
    FeedbackAnonymized,
    FeedbackGiven,
    InteractionAnonymized,
    InteractionRecorded,
    InvalidEvent,
    OutcomeAnonymized,
    OutcomeObserved,
    QualityAssessed,
    ToolCall,
    new_event,
    parse_event,
)
from flywheel_loop.schemas.personal import personal_paths, subject_of
from tests.conftest import RunningEngine, read_log, wait_for

SECRET_WORDS = "the quokka migration plan for Ms Okonkwo"


def anonymized(text: str = SECRET_WORDS, **fields: Any) -> Event[Any]:
    raw = new_event(InteractionRecorded(session_id="anon-0123456789abcdef", role="coder", model_id="m", input=text,
                                        output=f"answer to {text}", domain="web",
                                        context=Context(language="python", tests=f"# {text}", files=["a.py"]),
                                        tool_calls=[ToolCall(name="pytest", arguments=text, output="1 passed")],
                                        **fields), source="agent")
    return new_event(InteractionAnonymized(interaction_id=raw.id, interaction=raw.data), source="anonymizer",
                     cause=raw)


# --------------------------------------------------------------------------- the schema says what is personal


def test_the_schemas_type_which_fields_are_personal_and_whose_key_seals_them() -> None:
    paths = {p for p, _ in personal_paths(InteractionAnonymized)}
    assert paths == {("interaction", f) for f in ("input", "output")} | {
        ("interaction", "context", f) for f in ("project", "files", "git", "build", "tests", "extra")
    } | {("interaction", "tool_calls", "*", f) for f in ("arguments", "output")}
    assert {p for p, _ in personal_paths(FeedbackAnonymized)} == {
        ("feedback", f) for f in ("comment", "correction", "final_version")}
    assert {p for p, _ in personal_paths(OutcomeAnonymized)} == {("outcome", "errors")}
    # every log payload with personal text names the interaction whose key seals it; nothing else has any
    for event_type, cls in CATALOGUE.items():
        if cls.stream == "log":
            assert bool(personal_paths(cls)) == (cls.data_subject is not None), event_type
    event = anonymized()
    assert subject_of(event.data) == event.data.interaction_id
    assert not personal_paths(QualityAssessed)  # scores carry no words: never sealed


# --------------------------------------------------------------------------- sealing and opening


async def test_personal_text_is_sealed_on_the_log_and_opens_whole_in_another_process(
    bus: Bus, settings: Settings
) -> None:
    event = anonymized()
    fb_raw = new_event(FeedbackGiven(interaction_id=event.data.interaction_id, rating=2, comment=SECRET_WORDS,
                                     correction="def f(): ..."), source="agent")
    feedback = new_event(FeedbackAnonymized(feedback_id=fb_raw.id, feedback=fb_raw.data), source="anonymizer",
                         cause=fb_raw)
    await bus.publish_many([event, feedback])
    stored = [data async for _, data in bus.scan("log", ["fw.log.>"])]
    assert len(stored) == 2
    assert not any(word.encode() in data for data in stored for word in ("quokka", "Okonkwo", "def f()"))
    wire = parse_event(stored[0])
    # what is not personal stays readable; the personal fields hold blanks while sealed
    assert wire.forgotten and wire.sealed is not None and wire.sealed.key == event.data.interaction_id
    rec = wire.data.interaction
    assert (rec.role, rec.domain, rec.session_id, rec.context.language) == ("coder", "web", "anon-0123456789abcdef",
                                                                            "python")
    assert (rec.input, rec.output, rec.context.tests, rec.context.files) == ("", "", None, [])
    assert [(c.name, c.arguments, c.output) for c in rec.tool_calls] == [("pytest", "", "")]
    # one key seals everything about the interaction: the feedback too
    assert parse_event(stored[1]).sealed.key == wire.sealed.key  # type: ignore[union-attr]

    other = await Bus.connect(settings, bus.url)  # another process: a cold cache, the same key store
    try:
        assert await other.open_many(stored) == [event, feedback]
    finally:
        await other.close()


async def test_a_sealed_text_opens_only_in_the_event_it_was_sealed_in(bus: Bus) -> None:
    event = anonymized()
    [data] = await bus.encode_many([event])
    moved = data.replace(event.id.encode(), anonymized().id.encode())  # the same ciphertext under another id
    [opened] = await bus.open_many([moved])
    assert isinstance(opened, InvalidEvent) and "do not open with their key" in opened.reason


async def test_a_key_id_that_could_reach_other_keys_is_refused(bus: Bus, tmp_path: Path) -> None:
    event = anonymized()
    [data] = await bus.encode_many([event])
    for bad in (">", "*", "a.b", "../keys"):
        forged = data.replace(f'"key":"{event.data.interaction_id}"'.encode(), f'"key":"{bad}"'.encode())
        [opened] = await bus.open_many([forged])
        assert isinstance(opened, InvalidEvent) and "sealed.key" in opened.reason
    with pytest.raises(KeyStoreError, match="not a key id"):
        await FileKeyStore(tmp_path).create("../outside")
    with pytest.raises(KeyStoreError, match="not a key id"):
        await bus.keys.store.fetch(["$KV.>"])


async def test_destroying_a_key_forgets_its_subject_everywhere_and_for_good(bus: Bus, settings: Settings) -> None:
    kept, gone = anonymized("kept words"), anonymized()
    await bus.publish_many([kept, gone])
    stored = [data async for _, data in bus.scan("log", ["fw.log.>"])]
    assert await bus.keys.destroy([gone.data.interaction_id]) == 1
    for reader in (bus, await Bus.connect(settings, bus.url)):
        first, second = await reader.open_many(stored)
        assert first == kept  # the rest opens whole
        assert isinstance(second, Event) and second.forgotten and second.id == gone.id
        assert second.data.interaction.input == "" and second.data.interaction.role == "coder"
        if reader is not bus:
            await reader.close()
    # late intake about the forgotten interaction: its key cannot be made again, so nothing is sealed under it
    with pytest.raises(SubjectForgotten):
        await bus.keys.store.create(gone.data.interaction_id)
    late_raw = new_event(OutcomeObserved(interaction_id=gone.data.interaction_id, errors=["Traceback: quokka"]),
                         source="agent")
    late = new_event(OutcomeAnonymized(outcome_id=late_raw.id, outcome=late_raw.data), source="anonymizer")
    assert await bus.keys.writable([late, kept]) == [kept]
    assert await bus.keys.destroy([gone.data.interaction_id]) == 0  # again: nothing left to erase


class Witness:
    """A processor and a projection on the anonymized interactions, recording what the engine hands them."""

    def __init__(self) -> None:
        self.handled: list[Event[Any]] = []
        self.folded: list[Event[Any]] = []

    def handle(self, event: Event[Any], ctx: ProcessContext) -> list[Any]:
        self.handled.append(event)
        return []

    @hookimpl
    def register_processors(self, register: Callable[[Processor], None], settings: Settings) -> None:
        register(Processor("witness", ("interaction.anonymized",), self.handle))

    @hookimpl
    def register_projections(self, register: Callable[[Projection], None], settings: Settings) -> None:
        witness = self

        class Folded(Projection):
            name = "witnessed"
            consumes = ("interaction.anonymized",)

            def apply(self, db: Any, event: Event[Any], seq: int) -> None:
                witness.folded.append(event)

        register(Folded())


async def test_plugins_see_plain_payloads_or_a_forgotten_subject_never_a_ciphertext(
    bus: Bus, engine_with: Callable[..., RunningEngine]
) -> None:
    kept, gone = anonymized("kept words"), anonymized()
    await bus.publish_many([kept, gone])
    await bus.keys.destroy([gone.data.interaction_id])
    witness = Witness()
    async with engine_with(witness, builtins=False):
        await wait_for(lambda: len(witness.folded) == 2)
        await wait_for(lambda: witness.handled)
        await asyncio.sleep(0.5)  # would it hand the forgotten one over too?
    assert witness.handled == [kept]  # a processor derives nothing from a forgotten subject
    assert witness.folded[0] == kept  # a projection folds the plain payload...
    assert witness.folded[1].forgotten and witness.folded[1].id == gone.id  # ...and the forgotten one's rest
    assert witness.folded[1].data.interaction.input == "" and witness.folded[1].sealed is not None


class CountsOnly(Projection):
    """A projection that reads no personal field: its runner hands it events as stored."""

    name = "counts_only"
    consumes = ("interaction.anonymized",)
    personal = False

    def __init__(self) -> None:
        self.folded: list[Event[Any]] = []

    def apply(self, db: Any, event: Event[Any], seq: int) -> None:
        self.folded.append(event)


async def test_a_projection_that_reads_nothing_personal_folds_events_sealed_without_their_keys(
    bus: Bus, engine_with: Callable[..., RunningEngine]
) -> None:
    kept = anonymized("kept words")
    await bus.publish_many([kept])
    projection = CountsOnly()

    class Plugin:
        @hookimpl
        def register_projections(self, register: Callable[[Projection], None], settings: Settings) -> None:
            register(projection)

    fetched: list[list[str]] = []
    original = bus.keys.store.fetch

    async def fetch(key_ids: Any) -> Any:
        fetched.append(list(key_ids))
        return await original(key_ids)

    bus.keys.store.fetch = fetch  # type: ignore[method-assign]
    bus.keys._cache.clear()  # as a process that never held the key
    async with engine_with(Plugin(), builtins=False):
        await wait_for(lambda: projection.folded)
    [folded] = projection.folded
    assert folded.id == kept.id and folded.sealed is not None  # as stored: still sealed ...
    assert folded.data.interaction.input == "" and folded.data.interaction.role == "coder"  # ... its blanks
    assert folded.data.findings == kept.data.findings  # what is never personal reads as it was
    assert kept.data.interaction_id not in {k for keys in fetched for k in keys}  # its key was never asked for


# --------------------------------------------------------------------------- the key stores


async def test_the_file_key_store_creates_once_erases_and_keeps_a_tombstone(tmp_path: Path) -> None:
    store = FileKeyStore(tmp_path / "keys")
    await store.ensure()
    key = await store.create("01JWW9ZQ4A1B2C3D4E5F6G7H8J")
    assert len(key) == 32 and await store.create("01JWW9ZQ4A1B2C3D4E5F6G7H8J") == key  # one key per subject
    assert await store.fetch(["01JWW9ZQ4A1B2C3D4E5F6G7H8J", "01JWW9ZQ4A1B2C3D4E5F6G7H8K"]) == {
        "01JWW9ZQ4A1B2C3D4E5F6G7H8J": key}
    assert await store.destroy(["01JWW9ZQ4A1B2C3D4E5F6G7H8J"]) == 1
    assert await store.fetch(["01JWW9ZQ4A1B2C3D4E5F6G7H8J"]) == {"01JWW9ZQ4A1B2C3D4E5F6G7H8J": None}
    assert not any(key in p.read_bytes() for p in (tmp_path / "keys").iterdir())
    with pytest.raises(SubjectForgotten):
        await store.create("01JWW9ZQ4A1B2C3D4E5F6G7H8J")


async def test_a_bus_key_store_creates_many_keys_in_one_round_agreeing_with_other_processes(
    bus: Bus, settings: Settings
) -> None:
    other = await Bus.connect(settings, bus.url)
    try:
        ids = [f"01JWW9ZQ4A1B2C3D4E5F6G7H{i:02d}" for i in range(10)]
        theirs = await other.keys.store.create(ids[3])  # another process made this one first
        await other.keys.store.create(ids[7])
        await other.keys.store.destroy([ids[7]])  # and forgot this one
        made = await bus.keys.store.create_many([*ids, ids[0]])
        assert sorted(made) == ids and made[ids[3]] == theirs and made[ids[7]] is None
        assert all(len(k) == 32 for i, k in made.items() if i != ids[7]) and len(set(made.values())) == 10
        # what every process reads back is what the round answered; a second round creates nothing new
        assert await other.keys.store.fetch(ids) == made
        assert await other.keys.store.create_many(ids) == made
    finally:
        await other.close()


async def test_a_bus_key_store_that_does_not_answer_is_a_clear_error(
    settings: Settings, nats_server: EmbeddedServer
) -> None:
    quick = settings.model_copy(update={"keys": settings.keys.model_copy(update={"timeout_s": 1.0}),
                                        "nats": settings.nats.model_copy(update={"publish_retry_s": 1.0})})
    bus = await Bus.connect(quick, nats_server.url)
    await bus.ensure_streams()
    event = anonymized()
    nats_server.stop()
    try:
        with pytest.raises(KeyStoreUnavailable, match=r"key store \(the JetStream KV bucket FLYWHEEL_KEYS\) did not"):
            await bus.encode_many([event])
    finally:
        await bus.close()


async def test_with_the_key_folder_missing_the_engine_waits_rejects_nothing_and_then_goes_on(
    settings_with: Callable[..., Settings], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from flywheel_loop.engine.app import Engine
    from flywheel_loop.engine.plugin_host import PluginHost
    from tests.counting_plugin import CountingPlugin

    folder = tmp_path / "mounted-keys"
    settings = settings_with(keys={"store": "file", "folder": str(folder)})
    bus = await Bus.connect(settings, settings.nats.url or "")
    await bus.ensure_streams()  # creates the folder: then the "mount" goes away
    folder.rmdir()
    raw = new_event(InteractionRecorded(session_id="s", role="coder", model_id="m", input=SECRET_WORDS, output="o"),
                    source="agent")
    await bus.publish(raw)
    host = PluginHost(settings, load_entry_points=False)
    host.register(CountingPlugin(), "counting")
    running = RunningEngine(Engine(bus, host))
    with caplog.at_level(logging.ERROR, logger="flywheel_loop.engine.worker"):
        async with running:
            await wait_for(lambda: any("key folder" in r.getMessage() and "cannot be used" in r.getMessage()
                                       for r in caplog.records), timeout=30)
            assert await read_log(bus, "log") == []  # nothing published, nothing rejected
            folder.mkdir()
            await wait_for(lambda: read_log(bus, "log", "interaction.anonymized"), timeout=30)
    [out] = await read_log(bus, "log")
    assert out.type == "interaction.anonymized" and out.data.interaction.input == SECRET_WORDS
    assert SECRET_WORDS.encode() not in b"".join([d async for _, d in bus.scan("log", ["fw.log.>"])])
    assert [p.name for p in folder.iterdir()] == [raw.id]  # its key, in the folder
    await bus.close()
