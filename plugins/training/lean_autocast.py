"""bf16 autocast training without autocast's repeated casts of frozen weights and layer inputs.

Under ``torch.autocast`` every linear layer casts its float32 weight and its float32 input to bf16 on each
call. In LoRA training the base model's weights are frozen, so the cast gives the same bf16 tensor at every
step; and the layers of one block read the same input (q, k and v the normalised hidden states; gate and up
in the MLP), which autocast casts once per layer, then once more in each LoRA path after PEFT has cast it
back to float32 for the adapter. Measured on SmolLM2-135M (2 x 512-token blocks, LoRA on q, k, v and o, a
2-core Xeon with AMX), these casts and their backward copies were a sixth of a step.

``lean_autocast(model)`` keeps, for the length of a training run:

- the frozen weights of the linear layers stored in bf16 (the values autocast would cast them to), the float32
  originals put back afterwards, bit for bit; an output layer tied to the input embeddings (as in many models)
  reads a bf16 copy of its own for the run while the embeddings keep the float32 weight, and is tied again
  afterwards;
- each such layer's float32 input cast to bf16 once, shared by the layers that read the same tensor (a
  forward pre-hook; the cast is redone when the tensor changes), and PEFT's cast of the adapter's input
  back to the weight's dtype switched off (PEFT >= 0.15; older versions keep their cast), so dropout and
  the adapter's products take the bf16 input.

The base layers' products see the same bf16 operands as under plain autocast. What differs: LoRA dropout
scales the bf16 input (one rounding of the scaled value, where autocast rounded the float32 product), and
the gradients of the layers sharing an input are added in bf16 before the one cast back to float32. Outside
autocast (float32 training) nothing changes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = ["lean_autocast"]


@contextmanager
def lean_autocast(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> Iterator[int]:
    """Within: ``model``'s frozen linear weights stored in ``dtype`` and each linear input cast once (see the
    module docstring); yields how many weights were stored in ``dtype``. Everything is restored on exit."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    getter = getattr(model, "get_output_embeddings", None)
    output = getter() if callable(getter) else None
    originals: list[tuple[torch.Tensor, torch.Tensor]] = []
    casting: list[tuple[Any, bool]] = []
    hooks: list[Any] = []
    last: dict[str, Any] = {}
    untied: tuple[nn.Linear, torch.Tensor] | None = None

    def cast_once(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if not args or not isinstance(args[0], torch.Tensor):
            return None
        x: torch.Tensor = args[0]
        if x.dtype != torch.float32 or not torch.is_autocast_enabled(x.device.type):
            return None
        if last.get("source") is not x or last.get("version") != x._version:
            last.update(source=x, version=x._version, cast=x.to(dtype))
        return (last["cast"], *args[1:])

    try:
        # a weight another kind of module also holds (input embeddings tied to the output layer) stays float32
        shared = {id(p) for m in model.modules() if not isinstance(m, nn.Linear) for p in m.parameters(recurse=False)}
        for module in model.modules():
            if isinstance(module, BaseTunerLayer) and hasattr(module, "cast_input_dtype_enabled"):
                tuner: Any = module
                casting.append((tuner, tuner.cast_input_dtype_enabled))
                tuner.cast_input_dtype_enabled = False
                hooks.append(tuner.register_forward_pre_hook(cast_once))
            elif (isinstance(module, nn.Linear) and module is not output and not module.weight.requires_grad
                  and id(module.weight) not in shared):
                if module.weight.dtype == torch.float32:
                    # the float32 original waits in host memory (on a GPU it would sit beside the bf16 copy)
                    originals.append((module.weight, module.weight.data.to("cpu")))
                    module.weight.data = module.weight.data.to(dtype)
                hooks.append(module.register_forward_pre_hook(cast_once))
        if (isinstance(output, nn.Linear) and id(output.weight) in shared and not output.weight.requires_grad
                and output.weight.dtype == torch.float32):
            # the output layer reads the input embeddings' weight (tied): it gets a bf16 copy of its own for the
            # run (autocast cast the whole 49k x 576 matrix at every forward pass, a fiftieth of a demo step)
            untied = (output, output.weight)
            output.weight = nn.Parameter(output.weight.detach().to(dtype), requires_grad=False)
        yield len(originals)
    finally:
        if untied is not None:
            untied[0].weight = untied[1]  # tied again: the very parameter the embeddings hold
        for hook in hooks:
            hook.remove()
        for module, enabled in casting:
            module.cast_input_dtype_enabled = enabled
        for weight, data in originals:
            weight.data = data.to(weight.device)  # where the run moved the model meanwhile (accelerate)
        last.clear()
