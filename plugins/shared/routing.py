"""Which requests an adapter answers: a nearest-neighbour router fitted on its own dataset.

A LoRA adapter trained on a team's narrow work (its helper API, its conventions) also moves the
model's answers to everything else: SmolLM2-135M trained on the demo's corrections loses a third or
more of the general coding problems the base model solved, with every setting tried (rehearsal,
rank, learning rate, a KL anchor; README, The demo). Where the team's requests can be told from the
rest, the adapter need not answer the rest: the router sends a request to the adapter when its prompt
is nearer to the prompts the adapter was trained on for the role than to the general prompts it was
rehearsed with (cosine of ``TextEmbedder`` vectors, the nearest of each side; a tie goes to the model
without the adapter), and to the base model otherwise.

The router is fitted when the adapter is trained (``fit``: the dataset's train rows, the
self-synthesized rehearsal rows, ``source = "synthetic"``, on the general side, every other row on the
role's side) and stored beside the weights as ``router.json`` (the prompts, not their vectors: every
machine embeds them with its own embedder, so the gate and the server on one machine decide alike).
An adapter whose dataset holds no general rows has no router and answers everything, as before. The
gate measures the adapter as it is served, routed, so a request that the router sends to the adapter
and the adapter gets wrong counts against it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ROUTER_FILE", "Router", "RouterUnusable", "user_text"]

log = logging.getLogger(__name__)

ROUTER_FILE = "router.json"
RULE = "nearest"


class RouterUnusable(ValueError):
    """A ``router.json`` that cannot be read as a router."""


def user_text(row: dict[str, Any]) -> str | None:
    """The last user message of a dataset row (``messages``), or its ``text``; None when it has neither."""
    messages = row.get("messages")
    if isinstance(messages, list):
        for message in reversed(messages):
            if isinstance(message, dict) and message.get("role") == "user" and isinstance(message.get("content"), str):
                return str(message["content"])
    text = row.get("text")
    return text if isinstance(text, str) and text else None


@dataclass
class Router:
    """The prompts of each side; ``routes`` embeds requests with ``embed`` and compares."""

    role: list[str]
    general: list[str]
    _vectors: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)

    @classmethod
    def fit(cls, rows: Iterable[dict[str, Any]]) -> Router | None:
        """The router of a dataset's train ``rows``; None without prompts on both sides (nothing to tell apart)."""
        role: list[str] = []
        general: list[str] = []
        for row in rows:
            text = user_text(row)
            if text:
                (general if row.get("source") == "synthetic" else role).append(text)
        if not role or not general:
            return None
        # sorted and unique: the same router whatever the order of the rows
        return cls(sorted(set(role)), sorted(set(general)))

    def save(self, folder: Path) -> Path:
        path = folder / ROUTER_FILE
        path.write_text(json.dumps({"rule": RULE, "role": self.role, "general": self.general}, indent=1) + "\n")
        return path

    @classmethod
    def load(cls, folder: Path) -> Router | None:
        """The router stored in an adapter folder; None when it has none. Raises ``RouterUnusable``."""
        path = folder / ROUTER_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise RouterUnusable(f"{path}: {exc}") from exc
        if not isinstance(data, dict) or data.get("rule") != RULE:
            raise RouterUnusable(f"{path}: not a router of rule {RULE!r}")
        sides = data.get("role"), data.get("general")
        if not all(isinstance(s, list) and s and all(isinstance(t, str) for t in s) for s in sides):
            raise RouterUnusable(f"{path}: 'role' and 'general' must be non-empty lists of prompts")
        return cls(list(sides[0]), list(sides[1]))  # type: ignore[arg-type]

    def routes(self, prompts: Sequence[str], embed: Any) -> list[bool]:
        """For each prompt, True where the adapter answers it. ``embed(texts)`` gives unit vectors, one row
        a text (``TextEmbedder.embed``); the router's own prompts are embedded on first use."""
        if not prompts:
            return []
        if self._vectors is None:
            self._vectors = (np.asarray(embed(self.role)), np.asarray(embed(self.general)))
        role, general = self._vectors
        x = np.asarray(embed(list(prompts)))
        return [bool(a > b) for a, b in zip((x @ role.T).max(1), (x @ general.T).max(1), strict=True)]
