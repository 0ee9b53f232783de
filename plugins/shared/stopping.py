"""Stop generating once an answer has closed a fenced code block.

What follows a model's code block is prose the tests never see (an explanation, an example call);
generating it costs most of an answer's tokens on a small model. ``closed_fence`` is a transformers
stopping criterion that ends each sequence of a batch once its new tokens hold two fence markers
(an opened and a closed block); an answer with no fence runs to the end-of-text token or the token
limit as before. The demo's agent and the evaluator's task and suite runs use it, so both sides of
every comparison stop by the same rule.
"""

from __future__ import annotations

from typing import Any

__all__ = ["FENCE", "closed_fence"]

FENCE = "```"


def closed_fence(tokenizer: Any, start: int) -> Any:
    """A ``StoppingCriteriaList`` that stops each sequence whose tokens after position ``start`` (the
    prompt's length in the padded batch) hold a closed code fence."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class ClosedFence(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            texts = tokenizer.batch_decode(input_ids[:, start:], skip_special_tokens=True)
            return torch.tensor([t.count(FENCE) >= 2 for t in texts], dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([ClosedFence()])
