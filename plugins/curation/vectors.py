"""Prompt embeddings (all-MiniLM-L6-v2 through sentence-transformers) and their LanceDB store.

The vectors come from ``plugins/shared/embedding.py``'s ``TextEmbedder`` (shape-stable: a text's vector
never depends on its batch), which the routing of adapters uses too.

The store keeps one row per interaction id (merge by id, so writing twice changes nothing) in
a table named after the embedding setup, so changing the model or the token limit starts a
fresh table instead of mixing vectors.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

from flywheel_loop.plugins.shared.embedding import DIM, EmbeddingConfig, TextEmbedder, default_model_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is fetched from a hub at run time

__all__ = [
    "DIM",
    "TextEmbedder",
    "VectorStore",
    "default_model_dir",
    "embedding_text",
    "shared_embedder",
    "vectors_for",

]

log = logging.getLogger(__name__)

def embedding_text(prompt: str) -> str:
    """What is embedded for an interaction: its prompt, the task it was asked to do."""
    return prompt.strip()


class VectorStore:
    """One LanceDB table of prompt vectors per embedding setup, keyed by interaction id."""

    def __init__(self, path: Path, key: str) -> None:
        import lancedb

        path.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.table_name = f"prompts_{key}"
        # read_consistency_interval 0: every read sees what other handles (the embedder, another
        # process) committed since this one was opened
        self.db = lancedb.connect(str(path), read_consistency_interval=timedelta(0))
        self._table: Any = None

    @staticmethod
    def schema() -> Any:
        import pyarrow as pa

        return pa.schema(
            [
                pa.field("id", pa.string(), nullable=False),
                pa.field("role", pa.string()),
                pa.field("vector", pa.list_(pa.float32(), DIM)),
            ]
        )

    def _open(self, create: bool) -> Any:
        if self._table is None:
            names = self.db.list_tables()
            names = getattr(names, "tables", names)
            if self.table_name in names:
                self._table = self.db.open_table(self.table_name)
            elif create:
                self._table = self.db.create_table(self.table_name, schema=self.schema(), exist_ok=True)
        return self._table

    def upsert(self, ids: Sequence[str], roles: Sequence[str], vectors: np.ndarray) -> None:
        """Write vectors by id; an id written before is replaced (same text: same vector)."""
        if not ids:
            return
        import pyarrow as pa

        flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).ravel())
        batch = pa.table(
            {"id": list(ids), "role": list(roles), "vector": pa.FixedSizeListArray.from_arrays(flat, DIM)},
            schema=self.schema(),
        )
        table = self._open(create=True)
        table.merge_insert("id").when_matched_update_all().when_not_matched_insert_all().execute(batch)

    def get(self, ids: Sequence[str]) -> dict[str, np.ndarray]:
        """The stored vectors of those ids that have one."""
        table = self._open(create=False)
        if table is None or not ids:
            return {}
        import pyarrow as pa
        import pyarrow.compute as pc

        data = table.to_arrow()
        data = data.filter(pc.is_in(data["id"], value_set=pa.array(list(set(ids)), pa.string())))
        found = data["id"].to_pylist()
        if not found:
            return {}
        matrix = data["vector"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
        matrix = matrix.reshape(len(found), DIM).astype(np.float32, copy=False)
        return {i: matrix[n] for n, i in enumerate(found)}

    def count(self) -> int:
        table = self._open(create=False)
        return 0 if table is None else int(table.count_rows())

    def other_keys(self) -> list[str]:
        """The embedding setups of the other tables in this store."""
        listed: Any = self.db.list_tables()
        names: list[str] = [str(n) for n in getattr(listed, "tables", listed)]
        return sorted(n.removeprefix("prompts_") for n in names if n.startswith("prompts_") and n != self.table_name)

    def delete(self, ids: Sequence[str]) -> int:
        """Delete the vectors of ``ids`` for good: the rows, then (compaction and cleanup of old
        versions) the files that still held them. Returns how many rows there were."""
        table = self._open(create=False)
        if table is None or not ids:
            return 0
        import pyarrow as pa
        import pyarrow.compute as pc

        wanted = sorted(set(ids))
        data = table.to_arrow().select(["id"])
        present = int(pc.sum(pc.is_in(data["id"], value_set=pa.array(wanted, pa.string()))).as_py() or 0)
        if not present:
            return 0
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            table.delete("id IN (" + ", ".join(_sql_string(i) for i in chunk) + ")")
        # A deletion only marks rows; compacting rewrites the files without them, and dropping
        # the older versions removes the files that still hold the vectors. (LanceDB warns that a
        # reader still on an older version then fails: the builder's reads are retried, and
        # every handle here reads the latest version.)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"optimize\(cleanup_older_than=0\)")
            table.optimize(cleanup_older_than=timedelta(0), delete_unverified=True)
        return present


def _sql_string(value: str) -> str:
    """``value`` as a SQL string literal (LanceDB filters are SQL)."""
    return "'" + value.replace("'", "''") + "'"


def vectors_for(
    ids: Sequence[str], roles: Sequence[str], texts: Sequence[str], store: VectorStore | None, embedder: TextEmbedder
) -> np.ndarray:
    """Vectors of these interactions: from the store, the missing ones computed and stored."""
    have = store.get(ids) if store is not None else {}
    missing = [n for n, i in enumerate(ids) if i not in have]
    out = np.zeros((len(ids), DIM), dtype=np.float32)
    if missing:
        computed = embedder.embed([texts[n] for n in missing])
        if store is not None:
            try:
                store.upsert([ids[n] for n in missing], [roles[n] for n in missing], computed)
            except Exception as exc:  # the store is a cache: a failed write costs a recomputation later
                log.warning("could not store %d vectors in %s: %s", len(missing), store.path, exc)
        out[missing] = computed
    for n, i in enumerate(ids):
        if i in have:
            out[n] = have[i]
    return out


_EMBEDDERS: dict[str, TextEmbedder] = {}
_EMBEDDERS_LOCK = threading.Lock()


def shared_embedder(config: EmbeddingConfig, cache_dir: Path | None = None) -> TextEmbedder:
    """One loaded model per embedding setup in this process (the embedder and the builder share it);
    ``cache_dir`` (the state folder) keeps the precision probe's result."""
    key = config.model_dump_json() + f"|{cache_dir}"
    with _EMBEDDERS_LOCK:
        if key not in _EMBEDDERS:
            _EMBEDDERS[key] = TextEmbedder(config, cache_dir)
        return _EMBEDDERS[key]
