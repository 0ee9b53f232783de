"""LoRA dropout from NumPy's generator: the distribution of ``nn.Dropout``, reproducible from torch's seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from flywheel_loop.plugins.training.dropout import SeededDropout, _kept, use_seeded_dropout


def test_masks_keep_one_minus_p_and_scale_what_they_keep() -> None:
    drop = SeededDropout(0.25).train()
    x = torch.full((400, 500), 2.0)
    y = drop(x)
    kept = y != 0
    assert float(kept.float().mean()) == pytest.approx(0.75, abs=0.005)  # 200,000 draws: sd 0.001
    assert torch.allclose(y[kept], torch.tensor(2.0 / 0.75))
    # independent elements: the kept share of rows varies as a binomial's would (sd 0.019), not 0 or 1
    rows = kept.float().mean(dim=1)
    assert 0.005 < float(rows.std()) < 0.04


@pytest.mark.parametrize("p", [0.05, 0.1, 0.25, 0.5, 0.9, 1 / 3, 1 - 2**-26])
@pytest.mark.parametrize("n", [1, 7, 4096, 147_457])
def test_masks_from_raw_draws_are_those_of_the_float_draws(p: float, n: int) -> None:
    # the masks the earlier version drew: NumPy's float32 uniforms compared with p (the adapters' bytes depend on it)
    for seed in (0, 1, 2**61 + 12345):
        floats = np.random.Generator(np.random.PCG64(seed)).random(n, dtype=np.float32)
        assert np.array_equal(_kept(seed, n, p), floats >= np.float32(p))


def test_the_same_torch_seed_gives_the_same_masks_and_the_gradient_is_the_mask() -> None:
    drop = SeededDropout(0.5).train()
    x = torch.randn(64, 32)
    torch.manual_seed(3)
    a, b = drop(x), drop(x)
    torch.manual_seed(3)
    assert torch.equal(drop(x), a) and torch.equal(drop(x), b)
    assert not torch.equal(a, b)  # each call draws a new mask
    leaf = x.clone().requires_grad_(True)
    torch.manual_seed(4)
    drop(leaf).sum().backward()
    torch.manual_seed(4)
    mask = drop(torch.ones_like(x))
    assert leaf.grad is not None and torch.equal(leaf.grad, mask)


def test_evaluation_and_p_zero_leave_the_input_alone_and_bad_p_is_refused() -> None:
    x = torch.randn(8, 8)
    assert SeededDropout(0.3).eval()(x) is x
    assert SeededDropout(0.0).train()(x) is x
    with pytest.raises(ValueError, match="dropout probability"):
        SeededDropout(1.0)


def test_every_lora_dropout_of_a_peft_model_is_replaced() -> None:
    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj = nn.Linear(8, 8)
            self.v_proj = nn.Linear(8, 8)
            self.other = nn.Dropout(0.2)  # not a LoRA layer's: left as it is

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.v_proj(self.q_proj(x))

    model = get_peft_model(Tiny(), LoraConfig(r=2, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]))
    assert use_seeded_dropout(model) == 2
    found = [m for m in model.modules() if isinstance(m, SeededDropout)]
    assert len(found) == 2 and all(m.p == 0.1 for m in found)
    assert sum(type(m) is nn.Dropout for m in model.modules()) == 1
    assert use_seeded_dropout(model) == 0  # already replaced
    no_dropout = get_peft_model(Tiny(), LoraConfig(r=2, lora_dropout=0.0, target_modules=["q_proj"]))
    assert use_seeded_dropout(no_dropout) == 0


def test_switching_a_model_s_dropouts_off_switches_these_off() -> None:
    """TRL's DPO switches every ``nn.Dropout`` off by default (``disable_dropout``); these are ones."""
    from trl.trainer.utils import disable_dropout_in_model

    model = nn.ModuleDict({"drop": SeededDropout(0.4)})
    disable_dropout_in_model(model)
    x = torch.randn(16, 4)
    assert model["drop"].train()(x) is x


def test_a_bf16_input_is_scaled_by_one_over_one_minus_p_without_rounding_the_scale() -> None:
    torch.manual_seed(0)
    x = torch.randn(1_000_000).abs().add_(0.5).to(torch.bfloat16)
    out = SeededDropout(0.1).train()(x)
    kept = out != 0
    # a bf16 mask holding 1 / 0.9 would scale by 1.109375 (0.16 % low); one rounding of each scaled value
    # leaves the mean ratio at 1.1111 within a few parts in 100,000
    ratio = (out[kept].float() / x[kept].float()).mean().item()
    assert ratio == pytest.approx(1 / 0.9, rel=3e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.1, 0.3])
def test_output_and_gradient_are_torchs_dropout_with_the_pcg64_mask(dtype: torch.dtype, p: float) -> None:
    # the masks and their rounding decide the trained weights: a faster way to apply them must give these bits
    import numpy as np

    x = torch.randn(2, 50, 40).to(dtype).requires_grad_(True)
    upstream = torch.randn(2, 50, 40).to(dtype)
    torch.manual_seed(5)
    y = SeededDropout(p).train()(x)
    y.backward(upstream)
    torch.manual_seed(5)
    seed = int(torch.randint(0, 2**62, (1,)).item())
    uniform = np.random.Generator(np.random.PCG64(seed)).random(4000, dtype=np.float32)
    keep = torch.from_numpy(uniform).view(2, 50, 40) >= p
    ref_x = x.detach().clone().requires_grad_(True)
    ref = (ref_x * keep.to(dtype)).mul(1.0 / (1.0 - p))  # torch's own operations on the documented mask
    ref.backward(upstream)
    assert y.dtype == dtype and torch.equal(y, ref)
    assert x.grad is not None and ref_x.grad is not None and torch.equal(x.grad, ref_x.grad)
