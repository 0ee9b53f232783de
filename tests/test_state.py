"""A processor's state store: documents and tables commit with the output memo, or not at all;
the memo answers a redelivery with exactly the first answer."""

from __future__ import annotations

from pathlib import Path

import pytest

from flywheel_loop.engine.state import ProcessorState
from flywheel_loop.schemas import DatasetSkipped, TrainingRequested


def test_recall_distinguishes_unseen_nothing_and_outputs(tmp_path: Path) -> None:
    state = ProcessorState(tmp_path / "s.sqlite")
    request = TrainingRequested(role="coder", reason="volume", log_position=7, examples=120)
    skipped = DatasetSkipped(role="coder", reason="no_data", detail="nothing yet", log_position=7)
    assert state.recall("a") is None
    with state.transaction():
        state.remember("a", [])
        state.remember("b", [request, skipped])
    assert state.recall("a") == []
    assert state.recall("b") == [request, skipped]
    with state.transaction():
        state.remember("b", [request])  # a remembered answer the processor refused (still_valid) is replaced
    assert state.recall("b") == [request]


def test_writes_commit_with_the_memo_or_not_at_all(tmp_path: Path) -> None:
    state = ProcessorState(tmp_path / "s.sqlite", tables="CREATE TABLE IF NOT EXISTS seen (id TEXT PRIMARY KEY);")
    with pytest.raises(RuntimeError, match="boom"), state.transaction():
        state.put("role/coder", {"examples": 3})
        state.db.execute("INSERT INTO seen VALUES ('x')")
        state.remember("e1", [])
        raise RuntimeError("boom")
    assert state.get("role/coder") is None
    assert state.db.execute("SELECT COUNT(*) FROM seen").fetchone()[0] == 0
    assert state.recall("e1") is None
    with state.transaction():
        state.put("role/coder", {"examples": 3})
        state.put("role/fixer", {"examples": 1})
        state.remember("e1", [])
    reopened = ProcessorState(tmp_path / "s.sqlite")
    assert reopened.get("role/coder") == {"examples": 3}
    assert reopened.keys("role/") == ["role/coder", "role/fixer"]
    assert reopened.recall("e1") == []


def test_state_is_written_only_inside_a_transaction(tmp_path: Path) -> None:
    state = ProcessorState(tmp_path / "s.sqlite")
    with pytest.raises(RuntimeError, match="inside the worker's transaction"):
        state.put("k", 1)


def test_deleted_documents_leave_no_bytes_on_disk(tmp_path: Path) -> None:
    state = ProcessorState(tmp_path / "s.sqlite")
    secret = "the-words-of-a-forgotten-person-4711"
    with state.transaction():
        state.put("interaction/1", {"text": secret})
    with state.transaction():
        state.delete("interaction/1")
    state.close()
    on_disk = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    assert secret.encode() not in on_disk
