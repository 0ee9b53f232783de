"""Generation on a CPU without the copies that cost time and change nothing.

Two things, each giving the same tokens bit for bit as plain ``model.generate``:

- ``GrowingCache``: a key/value cache for ``generate(..., cache=GrowingCache())``. transformers' default
  ``DynamicCache`` appends each new token's keys and values with ``torch.cat``, which copies the whole cache
  of every layer at every step (16 answers of 160 tokens on SmolLM2-135M: up to 4 MB of keys and as much of
  values per layer and step).
  Here each layer writes into a buffer that doubles when full and hands attention a view of the filled part:
  the same keys and values, in the same order, with no copy.
- ``store_frozen_in_bf16(model)`` (through ``for_answering(model, bf16)``, which also freezes the model and puts
  it in eval mode): for a model that only answers, under bf16 autocast. Autocast casts every linear layer's
  float32 weight to bf16 on each call unless the weight requires a gradient (then it caches the cast for the
  length of the ``autocast`` block); the frozen base weights of a PEFT model are cast again at
  every generated token, and the output layer's 49k x 576 weight with them. Storing those weights in bf16 once
  (the values autocast casts them to; a frozen adapter's too) gives the matrix products the same operands.
  The output layer gets a bf16 weight of its own, so the input embeddings it may be tied to stay float32 (an
  embedding lookup is not cast by autocast).

``ops/bench/generate`` measures both against transformers' defaults (README, Benchmarks).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

__all__ = ["GrowingCache", "GrowingLayer", "for_answering", "store_frozen_in_bf16"]


class GrowingLayer(DynamicLayer):  # type: ignore[no-untyped-call]  # (transformers' __init_subclass__)
    """One layer's keys and values in buffers that double when full; ``keys``/``values`` are views of their
    filled part. What ``DynamicLayer``'s other methods (crop, batch selection, reordering) assign to ``keys``
    and ``values`` becomes the buffer at the next update."""

    _view: torch.Tensor | None = None
    _buffers: tuple[torch.Tensor, torch.Tensor]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.keys is None or self.values is None:
            raise RuntimeError("the cache layer holds no keys after its initialisation")
        if self.keys is not self._view:  # the first update, or another method replaced the states
            self._buffers = (self.keys, self.values)
        keys, values = self._buffers
        start = self.keys.shape[-2] if self.keys.numel() else 0  # the filled part is what ``keys`` shows
        end = start + key_states.shape[-2]
        if end > (keys.shape[-2] if keys.numel() else 0):
            keys = _grown(keys, key_states, start, 2 * end)
            values = _grown(values, value_states, start, 2 * end)
            self._buffers = (keys, values)
        keys[..., start:end, :] = key_states
        values[..., start:end, :] = value_states
        self.keys, self.values = keys[..., :end, :], values[..., :end, :]
        self._view = self.keys
        return self.keys, self.values


def _grown(buffer: torch.Tensor, like: torch.Tensor, filled: int, capacity: int) -> torch.Tensor:
    """A buffer shaped as ``like`` with room for ``capacity`` positions, holding ``buffer``'s first ``filled``."""
    grown = like.new_empty((*like.shape[:-2], capacity, like.shape[-1]))
    if filled:
        grown[..., :filled, :] = buffer[..., :filled, :]
    return grown


class GrowingCache(DynamicCache):
    """``DynamicCache`` with ``GrowingLayer`` layers: a fresh one for each ``generate`` call."""

    def __init__(self) -> None:
        Cache.__init__(self, layer_class_to_replicate=GrowingLayer)


def store_frozen_in_bf16(model: nn.Module) -> int:
    """Store every frozen float32 linear weight of ``model`` in bf16 (see the module docstring); returns how
    many. Only for a model that from now on runs under bf16 autocast and is not trained: outside autocast its
    linear layers would get float32 inputs for bf16 weights, which torch refuses."""
    stored = 0
    for module in model.modules():
        if isinstance(module, nn.Linear) and not module.weight.requires_grad and module.weight.dtype == torch.float32:
            module.weight = nn.Parameter(module.weight.detach().to(torch.bfloat16), requires_grad=False)
            stored += 1
    return stored


def for_answering(model: nn.Module, bf16: bool) -> None:
    """Make ``model`` a model that only answers: eval mode, every parameter frozen, and with ``bf16`` (it will run
    under bf16 autocast) its frozen linear weights stored in bf16."""
    model.eval()
    model.requires_grad_(False)
    if bf16:
        store_frozen_in_bf16(model)
