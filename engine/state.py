"""A stateful processor's state: a fold of the log, kept as a local cache.

A processor with ``stateful=True`` keeps SQL tables (``tables``) that its ``fold(db, event,
seq)`` updates from the events of ``folds`` (by default what it consumes) in log order. Every
process that runs the processor folds the same events in the same order, from the log alone, so
N processes on N machines share the work with no shared folder, and the local file is a cache:
deleted, it is folded again from the log (``<state_dir>/processors/<name>/state.sqlite``, with the
position it reached, as a projection keeps it).

- The fold may return the outputs an input causes (a pure policy, like the training trigger's):
  every process computes the same decisions at the same positions; the process the durable
  consumer delivered the input to publishes them (``decided`` as the handler).
- A processor that decides in ``handle`` (scoring, the deployer) reads the folded state, which the
  worker brings up to the end of the log before each batch.
- **Exactly once, also past the duplicate window.** The fold also reads the processor's own
  outputs on the log (``produces``; their source is the processor, their causation the input):
  an input whose outputs are on the log is answered, and a redelivery, however late, publishes
  nothing. Live events (``ctx.emit``: progress) come from ``<name>:live`` and do not count.

Deleted rows are overwritten (``secure_delete``) and the write-ahead log is truncated after a fold
that forgot data, so forgotten data leaves no bytes behind in the cache.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from flywheel_loop.engine.projection import Projection, ProjectionStore
from flywheel_loop.schemas import CATALOGUE, Event, Payload

if TYPE_CHECKING:
    from flywheel_loop.engine.processor import Processor

__all__ = ["LIVE_SUFFIX", "ProcessorFold", "ProcessorState", "live_source"]

#: live events (progress) a processor emits while it works come from ``<name>:live``
LIVE_SUFFIX = ":live"

_TABLES = """
CREATE TABLE IF NOT EXISTS _decisions (event_id TEXT PRIMARY KEY, outputs BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS _answered (event_id TEXT PRIMARY KEY, seq INTEGER NOT NULL);
"""

#: folds a processor's state: (db, event, stream sequence) -> the outputs the event causes, if decided here
Folder = Callable[[sqlite3.Connection, Event[Any], int], Sequence[Payload] | None]


def live_source(processor: str) -> str:
    return processor + LIVE_SUFFIX


class ProcessorFold(Projection):
    """The projection behind a stateful processor: its own tables, the decisions its fold made per
    input, and the inputs whose outputs are on the log."""

    def __init__(self, processor: Processor) -> None:
        self.processor = processor
        self.name = processor.name
        self.folds = tuple(processor.folds or processor.consumes)
        self.consumes = tuple(dict.fromkeys((*self.folds, *processor.produces)))
        self.tables = _TABLES + processor.tables
        self.version = processor.state_version
        #: a fold forgot data since the last checkpoint (the cache's write-ahead log still holds it)
        self.erased = False

    def apply(self, db: sqlite3.Connection, event: Event[Any], seq: int) -> None:
        processor = self.processor
        if event.source == processor.name and event.causation_id and event.type in processor.produces:
            db.execute("INSERT OR IGNORE INTO _answered VALUES (?, ?)", (event.causation_id, seq))
        if event.type not in self.folds or processor.fold is None:
            return
        decided = processor.fold(db, event, seq)
        if event.type == "data.forgotten":
            self.erased = True
        if decided is not None and event.type in processor.consumes:
            body = orjson.dumps([(p.event_type, p.model_dump_json()) for p in decided])
            db.execute("INSERT OR REPLACE INTO _decisions VALUES (?, ?)", (event.id, body))


class ProcessorState:
    """What a handler sees of its processor's state: the folded tables (``db``), the decision the
    fold made for an input, and whether an input is answered on the log."""

    def __init__(self, store: ProjectionStore) -> None:
        self.store = store
        self.db = store.db
        self.path: Path = store.path

    @classmethod
    def open(cls, processor: Processor, path: Path) -> ProcessorState:
        """The state of ``processor`` in the file ``path``, to fold by hand (``fold``): the worker's
        fold without a bus, for tools and tests."""
        return cls(ProjectionStore(ProcessorFold(processor), path, secure_delete=True))

    def fold(self, events: Iterable[tuple[int, Event[Any]]]) -> None:
        """Fold ``(log sequence, event)`` pairs in, as the worker does (those at or below the
        position are skipped)."""
        self.store.apply_batch([(seq, event, None) for seq, event in events])
        self.settle()

    def settle(self) -> None:
        """After folding: truncate the write-ahead log when a fold deleted data, so the deleted
        rows' bytes leave the disk too."""
        fold = self.store.projection
        if isinstance(fold, ProcessorFold) and fold.erased:
            fold.erased = False
            self.checkpoint()

    @property
    def position(self) -> int:
        """The last log sequence folded."""
        return self.store.position().seq

    def decision(self, event_id: str) -> list[Payload] | None:
        """The outputs the fold decided for ``event_id``; None when it decided nothing for it."""
        row = self.db.execute("SELECT outputs FROM _decisions WHERE event_id = ?", (event_id,)).fetchone()
        if row is None:
            return None
        return [CATALOGUE[t].model_validate_json(body) for t, body in orjson.loads(row[0])]

    def answered(self, event_id: str) -> bool:
        """Whether the outputs of input ``event_id`` are on the log."""
        return self.db.execute("SELECT 1 FROM _answered WHERE event_id = ?", (event_id,)).fetchone() is not None

    def checkpoint(self) -> None:
        """Truncate the write-ahead log (after a fold deleted data)."""
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def close(self) -> None:
        self.store.close()
