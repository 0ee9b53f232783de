"""Helpers for the serving tests: a tiny random Llama with the SmolLM2 tokenizer, real PEFT adapters in the
adapter store, and passed or failed evaluations of them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from flywheel_loop.schemas import EvaluationCompleted


def make_tiny_model(folder: Path, tokenizer: Any) -> Path:
    """A 2-layer Llama with random weights and the SmolLM2 tokenizer (and its chat template) in ``folder``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def random_lora(folder: Path, target_modules: list[str], std: float, seed: int, r: int = 4, dropout: float = 0.0
                ) -> tuple[Any, Any]:
    """(PEFT model, tokenizer): ``folder``'s model with a LoRA adapter whose B matrices are drawn from N(0, std)
    (they start at zero: moved, the adapter changes every output)."""
    from peft import LoraConfig, get_peft_model

    from flywheel_loop.plugins.shared.models import load_base

    model, tokenizer = load_base(folder)
    torch.manual_seed(seed)
    peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=target_modules))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)
    return peft, tokenizer


def store_random_adapter(base_dir: Path, state_dir: Path, seed: int) -> str:
    """A real LoRA adapter on ``base_dir`` with large random weights (so it changes the greedy answers), stored
    as the trainer stores it; return its hash."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from flywheel_loop.plugins.shared.models import store_adapter

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 2.0)
    digest, _ = store_adapter(peft_model, state_dir / "adapters", {"base_model": str(base_dir), "seed": seed})
    return digest


def evaluation(adapter_hash: str | None, passed: bool, role: str = "coder") -> EvaluationCompleted:
    return EvaluationCompleted(
        run_id=f"{role}-run-{(adapter_hash or 'none')[:8]}",
        role=role,
        adapter_hash=adapter_hash,
        candidate={"pass_rate": 0.6 if passed else 0.3},
        baseline={"pass_rate": 0.5},
        passed=passed,
        reasons=["task pass rate improved"] if passed else ["task pass rate fell by 20 points (2 allowed)"],
    )


def chat(endpoint: str, model: str, prompt: str = "Write a function that adds two numbers.") -> str:
    """One greedy chat completion from an OpenAI-compatible endpoint (what an agent does)."""
    import urllib.request

    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 12, "temperature": 0}
    request = urllib.request.Request(
        f"{endpoint}/chat/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return str(json.loads(response.read())["choices"][0]["message"]["content"])


def deployer_of(running: Any) -> Any:
    """The ``Deployer`` behind the running engine's deployer processor (to stop its servers after a test)."""
    worker = next(w for w in running.engine.workers if w.processor.name == "deployer")
    return worker.processor.handle.__self__
