"""Which requests an adapter answers: a nearest-neighbour router fitted on its own dataset.

A LoRA adapter trained on a team's narrow work (its helper API, its conventions) also moves the
model's answers to everything else: SmolLM2-135M trained on the demo's corrections loses a fifth to
two thirds of the general coding problems the base model solved, with every setting tried (rehearsal,
rank, learning rate, a KL anchor; README, The demo). Where the team's requests can be told from the
rest, the adapter need not answer the rest: the router sends a request to the adapter when its prompt
is nearer to the prompts the adapter was trained on for the role than to the general prompts it was
rehearsed with (cosine of all-MiniLM-L6-v2 vectors, the nearest of each side; a tie goes to the model
without the adapter), and to the base model otherwise.

The router is fitted when the adapter is trained (``fit``: the dataset's train rows, the
self-synthesized rehearsal rows, ``source = "synthetic"``, on the general side, every other row on the
role's side) and stored beside the weights as ``router.safetensors``: the two sides' vectors, not the
prompts (the adapter store keeps its folders after a data subject is forgotten). Its bytes are part of
the adapter's hash, so the same weights with and without a router are two artifacts. The vectors come
from ``TextEmbedder`` in float32 (``EMBEDDING``), whatever ``curation.embedding`` says, so the gate and the
server embed a request alike (on one machine exactly; across CPUs to the last bits of their float32
arithmetic, which can move a near tie). An adapter whose dataset holds no general
rows has no router and answers everything. The gate measures the adapter as it is served, routed, so a
request that the router sends to the adapter and the adapter gets wrong counts against it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flywheel_loop.plugins.shared.embedding import DIM, EmbeddingConfig, TextEmbedder

__all__ = ["EMBEDDING", "ROUTER_FILE", "Router", "RouterUnusable", "router_embedder", "user_text"]

ROUTER_FILE = "router.safetensors"
RULE = "nearest"
#: how the router's vectors are made: float32 whatever the CPU, so every machine embeds a request alike
EMBEDDING = EmbeddingConfig(precision="float32")

#: texts -> unit vectors, one row a text (``TextEmbedder.embed``)
Embed = Callable[[Sequence[str]], Any]


class RouterUnusable(ValueError):
    """A router that cannot be read, or whose embedding model cannot be loaded."""


def router_embedder(state_dir: Path | None = None, threads: int | None = None) -> TextEmbedder:
    """The embedding a router reads prompts with (``EMBEDDING``, ``threads`` torch threads while embedding),
    its model loaded now: one that cannot load raises ``RouterUnusable`` here, not on a first request."""
    try:
        embedder = TextEmbedder(EMBEDDING.model_copy(update={"threads": threads}), state_dir)
        embedder.embed(["warm up"])
    except (OSError, ValueError, RuntimeError) as exc:
        raise RouterUnusable(f"the router's embedding model cannot be loaded: {exc}") from exc
    return embedder


def user_text(row: dict[str, Any]) -> str | None:
    """The last user message of a dataset row (``messages``), or its ``text``; None when it has neither."""
    messages = row.get("messages")
    if isinstance(messages, list):
        for message in reversed(messages):
            if isinstance(message, dict) and message.get("role") == "user" and isinstance(message.get("content"), str):
                return str(message["content"])
    text = row.get("text")
    return text if isinstance(text, str) and text else None


@dataclass(eq=False)
class Router:
    """The unit vectors of each side's prompts (float32, one row a prompt)."""

    role: np.ndarray
    general: np.ndarray

    @classmethod
    def fit(cls, rows: Iterable[dict[str, Any]], embed: Embed) -> Router | None:
        """The router of a dataset's train ``rows``; None without prompts on both sides (nothing to tell apart)."""
        role: set[str] = set()
        general: set[str] = set()
        for row in rows:
            text = user_text(row)
            if text:
                (general if row.get("source") == "synthetic" else role).add(text)
        if not role or not general:
            return None
        # sorted and unique: the same router whatever the order of the rows
        return cls(np.asarray(embed(sorted(role)), dtype=np.float32),
                   np.asarray(embed(sorted(general)), dtype=np.float32))

    def to_bytes(self) -> bytes:
        """The router as a safetensors file, byte for byte the same for the same vectors (its bytes are part of
        the adapter's hash; ``safetensors.numpy.save`` orders its header differently from run to run)."""
        tensors = {"general": np.ascontiguousarray(self.general, dtype="<f4"),
                   "role": np.ascontiguousarray(self.role, dtype="<f4")}
        header: dict[str, Any] = {"__metadata__": {
            "rule": RULE, "embedding": json.dumps(EMBEDDING.model_dump(mode="json"), sort_keys=True)}}
        offset = 0
        for name, array in tensors.items():
            header[name] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
            offset += array.nbytes
        text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
        return len(text).to_bytes(8, "little") + text + b"".join(a.tobytes() for a in tensors.values())

    @classmethod
    def load(cls, folder: Path) -> Router | None:
        """The router stored in an adapter folder; None when it has none. Raises ``RouterUnusable``."""
        path = folder / ROUTER_FILE
        if not path.is_file():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="numpy") as f:
                rule = (f.metadata() or {}).get("rule")
                sides = {name: f.get_tensor(name) for name in ("role", "general")}
        except Exception as exc:  # safetensors raises its own errors for a damaged file
            raise RouterUnusable(f"{path}: {exc}") from exc
        if rule != RULE:
            raise RouterUnusable(f"{path}: not a router of rule {RULE!r}")
        for name, vectors in sides.items():
            if vectors.ndim != 2 or vectors.shape[0] == 0 or vectors.shape[1] != DIM:
                raise RouterUnusable(f"{path}: {name} holds {vectors.shape}, not prompt vectors of width {DIM}")
        return cls(sides["role"], sides["general"])

    def routes(self, prompts: Sequence[str | None], embed: Embed) -> list[bool]:
        """For each prompt, True where the adapter answers it (its nearest prompt is the role's); a request
        without a prompt text (None or empty) stays with the adapter, unembedded."""
        out = [True] * len(prompts)
        known = [i for i, text in enumerate(prompts) if text]
        if known:
            x = np.asarray(embed([str(prompts[i]) for i in known]), dtype=np.float32)
            for i, a, b in zip(known, (x @ self.role.T).max(1), (x @ self.general.T).max(1), strict=True):
                out[i] = bool(a > b)
        return out
