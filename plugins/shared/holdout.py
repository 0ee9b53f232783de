"""Which recorded interactions are held out of training: one seeded rule shared by the dataset
builder (its forgetting set) and the sampler (never samples them), so a task held out for
evaluation is neither sampled nor trained on."""

from __future__ import annotations

import hashlib

__all__ = ["DEFAULT_SEED", "DEFAULT_SHARE", "held_out", "unit"]

#: the hold-out's defaults: ``curation.dataset.seed`` and ``forgetting_share``, which the sampler reads too
DEFAULT_SEED = 0
DEFAULT_SHARE = 0.05


def unit(seed: int, *parts: str) -> float:
    """A seeded, stable number in [0, 1) for ``parts`` (hold-outs and splits)."""
    digest = hashlib.sha256("\x1f".join([str(seed), *parts]).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def held_out(seed: int, share: float, interaction_id: str) -> bool:
    """Whether ``interaction_id`` falls in the held-out ``share`` (the same ones for every dataset)."""
    return unit(seed, "forget", interaction_id) < share
