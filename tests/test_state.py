"""A stateful processor's state is a fold of the log: its tables, the decisions its fold made, and
the inputs whose outputs are on the log (answered, however late a redelivery comes)."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from flywheel_loop.engine.config import load_settings
from flywheel_loop.engine.processor import ProcessContext, Processor, apply_step, decided
from flywheel_loop.engine.state import ProcessorState, live_source
from flywheel_loop.schemas import (
    DataForgotten,
    Event,
    InteractionAnonymized,
    InteractionRecorded,
    Payload,
    TrainingRequested,
    derived_event,
    new_event,
)

TABLES = "CREATE TABLE IF NOT EXISTS seen (id TEXT PRIMARY KEY, input TEXT NOT NULL);"


def _fold(db: sqlite3.Connection, event: Event[Any], seq: int) -> list[Payload] | None:
    """Remember every interaction; forget them on request; every third one decides a request."""
    data = event.data
    if isinstance(data, DataForgotten):
        db.execute("DELETE FROM seen")
        return None
    assert isinstance(data, InteractionAnonymized)
    db.execute("INSERT OR IGNORE INTO seen VALUES (?, ?)", (event.id, data.interaction.input))
    (n,) = db.execute("SELECT COUNT(*) FROM seen").fetchone()
    return [TrainingRequested(role="coder", reason="volume", log_position=seq, examples=n)] if n % 3 == 0 else []


PROCESSOR = Processor(
    name="counter",
    consumes=("interaction.anonymized",),
    folds=("interaction.anonymized", "data.forgotten"),
    produces=("training.requested",),
    handle=decided,
    stateful=True,
    tables=TABLES,
    fold=_fold,
)


def raw(text: str) -> Event[Any]:
    recorded = InteractionRecorded(session_id="s", role="coder", model_id="m", input=text, output="ok")
    return new_event(recorded, source="t")


def interaction(text: str) -> Event[Any]:
    recorded = raw(text)
    return derived_event(InteractionAnonymized(interaction_id=recorded.id, interaction=recorded.data), cause=recorded,
                         source="anonymizer")


def test_the_fold_decides_per_input_and_the_handler_reads_the_decision(tmp_path: Path) -> None:
    state = ProcessorState.open(PROCESSOR, tmp_path / "s.sqlite")
    events = [interaction(f"task {i}") for i in range(6)]
    state.fold(enumerate(events, 1))
    assert state.position == 6
    decisions = [state.decision(e.id) for e in events]
    assert [len(d or ()) for d in decisions] == [0, 0, 1, 0, 0, 1]
    assert decisions[5] == [TrainingRequested(role="coder", reason="volume", log_position=6, examples=6)]
    ctx = ProcessContext(settings=load_settings(state_dir=tmp_path), log=logging.getLogger("t"), store=state)
    assert asyncio.run(apply_step(PROCESSOR, events[2], ctx)) == decisions[2]
    # folding the same positions again (another process, a redelivery) changes nothing
    state.fold(enumerate(events, 1))
    assert state.db.execute("SELECT COUNT(*) FROM seen").fetchone() == (6,)


def test_an_input_whose_outputs_are_on_the_log_is_answered_and_live_events_do_not_count(tmp_path: Path) -> None:
    state = ProcessorState.open(PROCESSOR, tmp_path / "s.sqlite")
    events = [interaction(f"task {i}") for i in range(3)]
    state.fold(enumerate(events, 1))
    (request,) = state.decision(events[2].id) or []
    live = derived_event(request, cause=events[2], source=live_source("counter"))
    other = derived_event(request, cause=events[1], source="someone_else")
    state.fold([(4, live), (5, other)])
    assert not state.answered(events[2].id) and not state.answered(events[1].id)
    state.fold([(6, derived_event(request, cause=events[2], source="counter"))])
    assert state.answered(events[2].id)
    ctx = ProcessContext(settings=load_settings(state_dir=tmp_path), log=logging.getLogger("t"), store=state)
    assert asyncio.run(apply_step(PROCESSOR, events[2], ctx)) == []  # a redelivery, however late


def test_a_deleted_cache_is_folded_again_to_the_same_state(tmp_path: Path) -> None:
    events = [interaction(f"task {i}") for i in range(7)]
    first = ProcessorState.open(PROCESSOR, tmp_path / "a.sqlite")
    first.fold(enumerate(events, 1))
    again = ProcessorState.open(PROCESSOR, tmp_path / "b.sqlite")
    again.fold((seq, e) for seq, e in enumerate(events, 1) if seq <= 4)
    again.fold(enumerate(events, 1))  # from another position, in two steps: the same tables
    for table in ("seen", "_decisions"):
        sql = f"SELECT * FROM {table} ORDER BY 1"
        assert first.db.execute(sql).fetchall() == again.db.execute(sql).fetchall()


def test_forgotten_rows_leave_no_bytes_in_the_cache(tmp_path: Path) -> None:
    secret = "the-words-of-a-forgotten-person-4711"
    state = ProcessorState.open(PROCESSOR, tmp_path / "s.sqlite")
    state.fold([(1, interaction(secret)), (2, interaction("task 2"))])
    forgotten = new_event(DataForgotten(subject="session", subject_hash="h"), source="t")
    state.fold([(3, forgotten)])
    assert state.db.execute("SELECT COUNT(*) FROM seen").fetchone() == (0,)
    state.close()
    on_disk = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    assert secret.encode() not in on_disk


def test_a_new_state_version_folds_the_cache_again(tmp_path: Path) -> None:
    state = ProcessorState.open(PROCESSOR, tmp_path / "s.sqlite")
    state.fold([(1, interaction("task"))])
    state.close()
    bumped = Processor(**{**PROCESSOR.__dict__, "state_version": 2})
    assert ProcessorState.open(bumped, tmp_path / "s.sqlite").position == 0


def test_a_stateful_processor_declares_what_it_produces_and_produces_nothing_else(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must declare what it produces"):
        Processor(name="x", consumes=("interaction.recorded",), handle=decided, stateful=True)
    with pytest.raises(ValueError, match="unknown event types"):
        Processor(name="x", consumes=("interaction.recorded",), handle=decided, produces=("no.such",))

    def anonymize(event: Event[Any], ctx: ProcessContext) -> list[Payload]:
        return [InteractionAnonymized(interaction_id=event.id, interaction=event.data)]

    sloppy = Processor(name="x", consumes=("interaction.recorded",), handle=anonymize, produces=("training.requested",))
    ctx = ProcessContext(settings=load_settings(state_dir=tmp_path), log=logging.getLogger("t"))
    with pytest.raises(TypeError, match=r"\['interaction.anonymized'\], which it does not declare"):
        asyncio.run(apply_step(sloppy, raw("task"), ctx))
