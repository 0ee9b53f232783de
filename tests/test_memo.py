"""A processor's output memo answers a redelivery with exactly the first answer."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from engine.memo import OutputMemo
from schemas import DatasetSkipped, TrainingRequested


def test_recall_distinguishes_unseen_nothing_and_outputs(tmp_path: Path) -> None:
    memo = OutputMemo(sqlite3.connect(tmp_path / "m.sqlite", isolation_level=None))
    request = TrainingRequested(role="coder", reason="volume", log_position=7, examples=120)
    skipped = DatasetSkipped(role="coder", reason="no_data", detail="nothing yet", log_position=7)
    assert memo.recall("a") is None
    memo.remember("a", [])
    memo.remember("b", [request, skipped])
    assert memo.recall("a") == []
    assert memo.recall("b") == [request, skipped]
    with pytest.raises(sqlite3.IntegrityError):
        memo.remember("b", [request])  # an input is answered once...
    memo.remember("b", [request], replace=True)  # ...unless the caller means to replace it
    assert memo.recall("b") == [request]
