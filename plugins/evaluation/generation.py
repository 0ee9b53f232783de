"""Greedy generation in batches, timed per generated token."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from flywheel_loop.plugins.shared.inference import GrowingCache
from flywheel_loop.plugins.shared.stopping import closed_fence

__all__ = ["Generations", "chat_prompt", "generate"]


@dataclass(frozen=True)
class Generations:
    texts: list[str]
    tokens: int
    seconds: float

    @property
    def ms_per_token(self) -> float | None:
        return 1000 * self.seconds / self.tokens if self.tokens else None


def chat_prompt(tokenizer: Any, text: str) -> str:
    """``text`` as a user turn in the model's chat template, ready for the answer."""
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        return str(rendered)
    return f"<|user|>\n{text}\n<|assistant|>\n"


def generate(
    model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, batch: int = 8, bf16: bool = False,
    advance: Callable[[int], None] | None = None, stop_after_code: bool = False,
) -> Generations:
    """Greedy answers to already templated ``prompts`` (left-padded batches), in order;
    ``advance(n)`` is told of each batch of ``n`` answers. ``stop_after_code``: an answer ends once it
    has closed a fenced code block (``plugins/shared/stopping.py``), which is all a test run reads."""
    texts: list[str] = []
    produced = 0
    started = time.perf_counter()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(prompts), batch):
            chunk = list(prompts[i : i + batch])
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            ctx = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
            stop = closed_fence(tokenizer, enc["input_ids"].shape[1]) if stop_after_code else None
            with torch.no_grad(), ctx:
                out = model.generate(
                    **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                    stopping_criteria=stop, cache=GrowingCache(),
                )
            new = out[:, enc["input_ids"].shape[1] :]
            for row in new:
                ids = row.tolist()
                if tokenizer.eos_token_id in ids:
                    ids = ids[: ids.index(tokenizer.eos_token_id)]
                ids = [t for t in ids if t != tokenizer.pad_token_id]
                produced += len(ids) or 1
                texts.append(tokenizer.decode(ids, skip_special_tokens=True))
            if advance is not None:
                advance(len(chunk))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return Generations(texts, produced, time.perf_counter() - started)
