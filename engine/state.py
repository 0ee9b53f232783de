"""A processor's state, kept by the engine: keyed documents, tables, and the output memo.

A stateful processor (``Processor(stateful=True)``) folds its inputs into state (scoring's
evidence, the trigger's counters, the deployer's book). The worker gives its handler
``ctx.state`` and wraps each input in one transaction (eventsourcing's process application):

1. if the memo holds the input's id, the handler is not called: the worker answers with the
   outputs recorded the first time (a redelivery, before or after the duplicate window);
2. otherwise the handler runs inside ``BEGIN IMMEDIATE``; what it writes (``put``,
   ``delete``, or SQL on ``db`` for tables it declared) and the memo row of its outputs are
   committed together, or not at all when it raises.

So an input is applied once, and a redelivered input produces the same outputs, with the
same derived ids, whatever happened between the commit and the publish.

Deleted rows are overwritten (``secure_delete``) and the write-ahead log is truncated after a
commit that deleted something, so data a processor forgets leaves no bytes behind.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson

from flywheel_loop.schemas import CATALOGUE, Payload

__all__ = ["ProcessorState"]

_TABLES = """
CREATE TABLE IF NOT EXISTS _docs (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS _memo (event_id TEXT PRIMARY KEY, outputs BLOB NOT NULL);
"""


class ProcessorState:
    """One processor's SQLite store under ``<state_dir>/processors/<name>/state.sqlite``."""

    def __init__(self, path: Path, tables: str = "") -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        #: the connection, for processors that keep tables of their own (declared in ``tables``)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA secure_delete=ON")
        self.db.executescript(_TABLES + tables)
        self._in_transaction = False
        self._erased = False

    # ---------------------------------------------------------------- documents

    def get(self, key: str) -> Any:
        """The document stored under ``key`` (JSON values), or None."""
        row = self.db.execute("SELECT value FROM _docs WHERE key = ?", (key,)).fetchone()
        return None if row is None else orjson.loads(row[0])

    def put(self, key: str, value: Any) -> None:
        self._writing()
        self.db.execute(
            "INSERT INTO _docs VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, orjson.dumps(value)),
        )

    def delete(self, key: str) -> None:
        self._writing()
        self._erased = True
        self.db.execute("DELETE FROM _docs WHERE key = ?", (key,))

    def keys(self, prefix: str = "") -> list[str]:
        rows = self.db.execute(
            "SELECT key FROM _docs WHERE key >= ? AND key < ? ORDER BY key", (prefix, prefix + "\U0010ffff")
        )
        return [r[0] for r in rows]

    def erased(self) -> None:
        """Say that SQL on ``db`` deleted data: the write-ahead log is truncated after the commit."""
        self._erased = True

    def _writing(self) -> None:
        if not self._in_transaction:
            raise RuntimeError("processor state is written only inside the worker's transaction")

    # ---------------------------------------------------------------- the memo

    def recall(self, event_id: str) -> list[Payload] | None:
        """What ``event_id`` produced ([] for nothing), or None when it was never handled."""
        row = self.db.execute("SELECT outputs FROM _memo WHERE event_id = ?", (event_id,)).fetchone()
        if row is None:
            return None
        return [CATALOGUE[t].model_validate_json(body) for t, body in orjson.loads(row[0])]

    def remember(self, event_id: str, outputs: Sequence[Payload]) -> None:
        """Record what ``event_id`` produced (inside the transaction)."""
        self._writing()
        body = orjson.dumps([(p.event_type, p.model_dump_json()) for p in outputs])
        self.db.execute(
            "INSERT INTO _memo VALUES (?, ?) ON CONFLICT (event_id) DO UPDATE SET outputs = excluded.outputs",
            (event_id, body),
        )

    def forget_outputs(self, event_ids: Sequence[str]) -> None:
        """Drop memo rows (their outputs were about data that is being forgotten)."""
        self._writing()
        self._erased = True
        self.db.executemany("DELETE FROM _memo WHERE event_id = ?", [(e,) for e in event_ids])

    # ---------------------------------------------------------------- transactions

    @contextmanager
    def transaction(self) -> Iterator[ProcessorState]:
        """Everything written inside commits together, or not at all."""
        if self._in_transaction:
            raise RuntimeError("processor state transactions do not nest")
        self.db.execute("BEGIN IMMEDIATE")
        self._in_transaction = True
        try:
            yield self
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        finally:
            self._in_transaction = False
        self.db.execute("COMMIT")
        if self._erased:
            self._erased = False
            # the write-ahead log still holds the old pages until they are checkpointed
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def close(self) -> None:
        self.db.close()
