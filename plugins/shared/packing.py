"""Answer-only labels and sequence packing with a block-diagonal attention mask.

A row (``prompt``, ``completion``: the chat-templated text, see ``plugins/chat_format.py``)
becomes token ids with the prompt's labels set to ``IGNORE`` (-100), so the loss counts the
answer tokens only. Examples are packed first-fit into blocks of at most ``block_tokens``; each
block carries a segment id per token, and ``attention_bias`` turns the segments into a 4-D
additive mask (causal inside a segment, nothing across segments) with position ids restarting
at 0 for each segment. Resetting position ids alone does not isolate packed examples on CPU
attention kernels; the mask does. A batch also carries each row's segment spans: a model loaded with
``segment_attention`` (``plugins/shared/segment_attention.py``, as ``load_base`` loads) attends within
each example only, with the same result for the scores that are used, and ignores the mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from flywheel_loop.plugins.shared.segment_attention import segment_spans, uses_segment_attention

__all__ = [
    "CE_CHUNK", "IGNORE", "Block", "Example", "anchored_losses", "attention_bias", "block_loss", "collate",
    "cross_entropy_sum", "pack", "token_losses", "tokenize_rows",
]

IGNORE = -100


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]

    @property
    def answer_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


@dataclass(frozen=True)
class Block:
    """Packed examples: their ids and labels one after the other, and which example each token is."""

    input_ids: list[int]
    labels: list[int]
    segments: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


def tokenize_rows(rows: Sequence[dict[str, Any]], tokenizer: Any, max_tokens: int) -> list[Example]:
    """One ``Example`` per row with answer-only labels, cut to ``max_tokens``; rows whose answer
    does not survive the cut are dropped."""
    out: list[Example] = []
    for row in rows:
        prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        answer = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
        ids = (list(prompt) + list(answer))[:max_tokens]
        labels = ([IGNORE] * len(prompt) + list(answer))[:max_tokens]
        if len(ids) < 2:
            continue
        labels[0] = IGNORE  # the first token of a segment is never predicted (nothing before it)
        ex = Example(ids, labels)
        if ex.answer_tokens:
            out.append(ex)
    return out


def pack(examples: Sequence[Example], block_tokens: int) -> list[Block]:
    """First-fit packing in the given order (an example longer than a block gets its own)."""
    blocks: list[list[Example]] = []
    sizes: list[int] = []
    for ex in examples:
        n = len(ex.input_ids)
        for i, used in enumerate(sizes):
            if used + n <= block_tokens:
                blocks[i].append(ex)
                sizes[i] += n
                break
        else:
            blocks.append([ex])
            sizes.append(n)
    out = []
    for members in blocks:
        ids: list[int] = []
        labels: list[int] = []
        segments: list[int] = []
        for s, ex in enumerate(members):
            ids += ex.input_ids
            labels += ex.labels
            segments += [s] * len(ex.input_ids)
        out.append(Block(ids, labels, segments))
    return out


def attention_bias(segments: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(batch, 1, L, L) additive mask from (batch, L) segment ids: 0 where a token may attend
    (same segment, not later), the dtype's minimum elsewhere. Padding has segment -1 and attends
    to earlier padding only, so no row is all masked."""
    length = segments.shape[1]
    same = segments[:, :, None] == segments[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool, device=segments.device).tril()
    allowed = same & causal
    bias = torch.zeros(allowed.shape, dtype=dtype, device=segments.device)
    bias.masked_fill_(~allowed, torch.finfo(dtype).min)
    return bias[:, None, :, :]


def collate(blocks: Sequence[Block], pad_id: int, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """A batch: ``input_ids``, ``labels``, ``position_ids`` (restarting per segment), the 4-D
    ``attention_mask`` and ``segment_spans`` (each row's examples as (start, end))."""
    length = max(len(b) for b in blocks)
    ids = torch.full((len(blocks), length), pad_id, dtype=torch.long)
    labels = torch.full((len(blocks), length), IGNORE, dtype=torch.long)
    segments = torch.full((len(blocks), length), -1, dtype=torch.long)
    positions = torch.zeros((len(blocks), length), dtype=torch.long)
    spans = tuple(segment_spans(b.segments) for b in blocks)
    for i, b in enumerate(blocks):
        n = len(b)
        ids[i, :n] = torch.tensor(b.input_ids)
        labels[i, :n] = torch.tensor(b.labels)
        segments[i, :n] = torch.tensor(b.segments)
        for start, end in spans[i]:
            positions[i, start:end] = torch.arange(end - start)
    return {
        "input_ids": ids,
        "labels": labels,
        "position_ids": positions,
        "attention_mask": attention_bias(segments, dtype),
        "segment_spans": spans,
    }


def _answer_logits(model: Any, batch: dict[str, Any], bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits of the positions that predict an answer token, those tokens), row by row.

    Only those positions go through the vocabulary projection (``logits_to_keep`` as a boolean mask):
    with a 49k-token vocabulary that projection is a large share of the work, and the prompt's logits
    are never used."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    if device.type != "cpu" or not uses_segment_attention(model):  # measured faster on CPU only
        batch.pop("segment_spans", None)
    labels = batch.pop("labels")
    target = labels[:, 1:]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = target != IGNORE
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    with ctx:
        logits = model(**batch, logits_to_keep=keep).logits
    wanted = target[keep[:, :-1]]
    logits = logits.reshape(-1, logits.shape[-1])
    if logits.shape[0] != wanted.shape[0]:  # a model that ignores a mask for logits_to_keep: all positions
        logits = logits.reshape(labels.shape[0], labels.shape[1], -1)[:, :-1][keep[:, :-1]]
    return logits, wanted


#: answer tokens whose cross-entropy is computed at once: the float32 copy of a chunk's logits and the
#: gradients' temporaries over a 49k-token vocabulary are 25 MB, where a whole batch's (500+ answer tokens) were
#: 110 MB each, allocated and written several times a step (the log-probabilities kept for the backward pass
#: are the whole batch's either way)
CE_CHUNK = 128


def cross_entropy_sum(logits: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """The summed float32 cross-entropy of ``logits`` (rows) against ``wanted``, ``CE_CHUNK`` rows at a time
    (the same sum; its gradient flows back through one split)."""
    parts = [F.cross_entropy(rows.float(), targets, ignore_index=IGNORE, reduction="sum")
             for rows, targets in zip(torch.split(logits, CE_CHUNK), torch.split(wanted, CE_CHUNK), strict=True)]
    return torch.stack(parts).sum()  # an empty input is one empty chunk, whose sum is 0


def token_losses(model: Any, batch: dict[str, Any], bf16: bool) -> tuple[torch.Tensor, int]:
    """(sum of the answer tokens' cross-entropy, how many answer tokens) of one batch."""
    logits, wanted = _answer_logits(model, batch, bf16)
    return cross_entropy_sum(logits, wanted), int(wanted.numel())


def anchored_losses(
    model: Any, batch: dict[str, Any], bf16: bool, weight: float, peft: Any = None
) -> tuple[torch.Tensor, int]:
    """``token_losses`` plus ``weight`` times the KL divergence from the base model's next-token distribution
    to the model's, summed over the same answer tokens (so the reported training loss includes it).
    ``model`` is a PEFT model, or wraps ``peft``, one (as a distributed wrapper does): the base model is the
    same model with its adapters disabled (one more forward pass, without gradients). The anchor acts on the
    answer tokens only; what it holds back elsewhere is measured, not implied (README, The demo)."""
    with torch.no_grad(), (peft or model).disable_adapter():
        reference, _ = _answer_logits(model, batch, bf16)
    logits, wanted = _answer_logits(model, batch, bf16)
    ce = cross_entropy_sum(logits, wanted)
    kl = F.kl_div(F.log_softmax(logits.float(), dim=-1), F.log_softmax(reference.float(), dim=-1),
                  log_target=True, reduction="sum")
    return ce + weight * kl, int(wanted.numel())


def block_loss(model: Any, blocks: Sequence[Block], pad_id: int, batch: int = 4, bf16: bool = False) -> float | None:
    """Mean answer-token loss over ``blocks`` (no gradients); None without answer tokens."""
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(blocks), batch):
            s, n = token_losses(model, collate(blocks[i : i + batch], pad_id), bf16)
            total += float(s)
            count += n
    model.train(was_training)
    return total / count if count else None
