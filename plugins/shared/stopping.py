"""Stop generating once an answer has closed a fenced code block.

What follows a model's code block is prose the tests never see (an explanation, an example call);
generating it costs most of an answer's tokens on a small model. ``closed_fence`` is a transformers
stopping criterion that ends each sequence of a batch once its new tokens hold two fence markers
(an opened and a closed block); an answer with no fence runs to the end-of-text token or the token
limit as before; ``through_code`` cuts an answer there. The demo's agent, the evaluator's task and
suite runs, self-synthesized rehearsal and the sampler use it, so both sides of every comparison stop by the
same rule.
"""

from __future__ import annotations

from typing import Any

__all__ = ["FENCE", "closed_fence", "through_code"]

FENCE = "```"


def through_code(text: str) -> str | None:
    """``text`` up to the end of its first closed code block; None when it closes none."""
    first = text.find(FENCE)
    close = text.find(FENCE, first + len(FENCE)) if first >= 0 else -1
    return text[: close + len(FENCE)] if close >= 0 else None


def closed_fence(tokenizer: Any, start: int) -> Any:
    """A ``StoppingCriteriaList`` that stops each sequence whose tokens after position ``start`` (the
    prompt's length in the padded batch) hold a closed code fence."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class ClosedFence(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            texts = tokenizer.batch_decode(input_ids[:, start:], skip_special_tokens=True)
            closed = [through_code(t) is not None for t in texts]
            return torch.tensor(closed, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([ClosedFence()])
