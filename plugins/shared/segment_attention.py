"""Attention over packed blocks, one example at a time.

A packed block (``plugins/shared/packing.py``) holds several examples one after the other; the
4-D mask keeps each token to its own example. Attention over the whole block with that mask
computes every score of the block and throws most of them away: with examples of about 100 tokens
in a 512-token block, about a tenth of the scores are used, and on CPU the fused attention kernel's
backward pass over the full block was a fifth of a training step (SmolLM2-135M, 2 blocks a step).

``segment_attention`` takes the examples' spans (``segment_spans``, given by ``collate``) and
computes causal attention inside each span only: the same result as the masked attention (the
masked scores are exactly zero after the softmax) for the cost of the scores that are used. Small
matrix products with an explicit causal mask and a float32 softmax are faster on CPU than the fused
kernel's backward pass at these sizes. Padding after the last span gets zeros (its labels are never
counted). Only on CPU, where it was measured; on a GPU, and for architectures whose attention takes
arguments it does not apply (soft-capping, sliding windows, sinks, position biases), it is SDPA with the
mask.

``register()`` adds it to transformers' ``AttentionInterface`` as ``SEGMENT_ATTENTION``; ``load_base``
registers it and loads models with it. Called without spans (generation, the cache, any caller that does not pack),
it is transformers' own SDPA attention with the same arguments, and its masks are SDPA's.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "SEGMENT_ATTENTION", "Spans", "register", "segment_attention", "segment_spans", "uses_segment_attention",
]

SEGMENT_ATTENTION = "flywheel_segments"

Spans = tuple[tuple[tuple[int, int], ...], ...]
"""Per row of a batch, the (start, end) of each example in it, in order, from position 0."""


def segment_spans(segments: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """(start, end) of each run of equal segment ids."""
    spans = []
    start = 0
    for i in range(1, len(segments) + 1):
        if i == len(segments) or segments[i] != segments[i - 1]:
            spans.append((start, i))
            start = i
    return tuple(spans)


def _causal(n: int, device: torch.device) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool, device=device).triu(1)


def segment_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    segment_spans: Spans | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """(batch, length, heads, head_dim) attention output, as transformers' attention functions return it.
    ``query`` is (batch, heads, length, head_dim); ``key``/``value`` may have fewer heads (grouped-query
    attention: each key/value head serves ``heads / kv_heads`` query heads)."""
    if segment_spans is None or query.device.type != "cpu" or _needs_sdpa(kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    batch, heads, length, _ = query.shape
    if len(segment_spans) != batch:
        raise ValueError(f"segment_spans has {len(segment_spans)} rows for a batch of {batch}")
    if key.shape[2] != length:
        raise ValueError("segment attention needs keys for exactly the query positions (no cache)")
    groups = heads // key.shape[1]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    rows = []
    for i, spans in enumerate(segment_spans):
        parts = []
        end = 0
        for start, stop in spans:
            if start != end or not start < stop <= length:
                raise ValueError(f"row {i}: spans must follow each other from 0 within {length}, got {spans}")
            end = stop
            q = query[i, :, start:end]
            k = key[i, :, start:end].repeat_interleave(groups, dim=0)
            v = value[i, :, start:end].repeat_interleave(groups, dim=0)
            scores = torch.matmul(q, k.transpose(-1, -2)) * scale
            scores = scores.masked_fill(_causal(end - start, scores.device), float("-inf"))
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
            if dropout > 0.0 and module.training:
                probs = F.dropout(probs, p=dropout)
            parts.append(torch.matmul(probs, v))
        if end < length:
            parts.append(value.new_zeros(heads, length - end, value.shape[-1]))
        rows.append(torch.cat(parts, dim=1).transpose(0, 1))
    return torch.stack(rows), None


#: arguments some architectures give their attention function that the spans path does not apply (logit
#: soft-capping, sliding windows, attention sinks, position biases): with any of them set, SDPA and the mask
_SDPA_ONLY = ("softcap", "sliding_window", "s_aux", "position_bias")


def _needs_sdpa(kwargs: dict[str, Any]) -> bool:
    return any(kwargs.get(name) is not None for name in _SDPA_ONLY) or kwargs.get("is_causal") is False


def uses_segment_attention(model: Any) -> bool:
    """Whether ``model`` (or the model a wrapper such as PEFT's or a distributed one holds) attends with
    ``segment_attention``, so that passing ``segment_spans`` is understood."""
    seen = 0
    while model is not None and seen < 4:
        config = getattr(model, "config", None)
        if config is not None:
            return getattr(config, "_attn_implementation", None) == SEGMENT_ATTENTION
        model = getattr(model, "module", None)
        seen += 1
    return False


@functools.cache
def register() -> str:
    """Make ``SEGMENT_ATTENTION`` an attention implementation transformers loads models with (its masks:
    SDPA's); return the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(SEGMENT_ATTENTION, segment_attention)
    AttentionMaskInterface.register(SEGMENT_ATTENTION, sdpa_mask)
    return SEGMENT_ATTENTION
