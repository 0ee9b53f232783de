"""Conversions into GGUF for the llama.cpp runtime, with llama.cpp's own scripts.

- A PEFT adapter folder becomes a GGUF LoRA adapter with ``convert_lora_to_gguf.py`` (it reads only the
  base model's ``config.json``, from ``--base``), cached under ``<root>/adapters/<adapter hash>/``.
- A Hugging Face base folder becomes a GGUF model with ``convert_hf_to_gguf.py``, cached under
  ``<root>/base/``, keyed by the folder's path and its files' sizes and times.
- ``prune_adapters`` keeps the most recently used converted adapters and deletes older ones.

The scripts come from the ``vendor/llama.cpp`` folder of the llama-cpp-python source package, which
``ops/build-llama-cpp`` keeps in ``${FLYWHEEL_CACHE:-~/.cache/flywheel}/llama.cpp-<version>`` (the wheel does not
ship them). They run in a subprocess of this interpreter (they need torch, transformers and numpy, which flywheel
has) and import their own ``gguf-py``, the version matching the C++ code. Every output is written to a temporary
name and renamed, so a crash never leaves a half-written GGUF under its final name.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

from flywheel_loop.engine.extensions import RuntimeUnavailable
from flywheel_loop.plugins.shared.routing import ROUTER_FILE

__all__ = [
    "LLAMA_CPP_VERSION",
    "ConversionFailed",
    "convert_adapter",
    "convert_base",
    "prune_adapters",
    "scripts_dir",
]

LLAMA_CPP_VERSION = "0.3.36"
"""The llama-cpp-python release ops/build-llama-cpp builds, and whose conversion scripts are used."""

CONVERT_TIMEOUT_S = 1800.0
LOG_TAIL_LINES = 20


class ConversionFailed(RuntimeUnavailable):
    """A llama.cpp conversion script failed; the message has its last output lines."""


def default_scripts_dir() -> Path:
    cache = Path(os.environ.get("FLYWHEEL_CACHE") or Path.home() / ".cache" / "flywheel")
    return cache / f"llama.cpp-{LLAMA_CPP_VERSION}"


def scripts_dir(configured: Path | None = None) -> Path:
    """The folder holding ``convert_lora_to_gguf.py``, ``convert_hf_to_gguf.py``, ``conversion/`` and ``gguf-py/``;
    ``RuntimeUnavailable`` saying how to get it when it is not there."""
    folder = Path(configured) if configured is not None else default_scripts_dir()
    needed = ("convert_lora_to_gguf.py", "convert_hf_to_gguf.py", "conversion", "gguf-py")
    missing = [name for name in needed if not (folder / name).exists()]
    if missing:
        hint = (
            "set llama_cpp.scripts_dir to llama.cpp's source folder"
            if configured is not None
            else "run `bash ops/build-llama-cpp`, which keeps them there"
        )
        absent = ", ".join(missing)
        raise RuntimeUnavailable(f"llama.cpp's conversion scripts are missing from {folder} ({absent}): {hint}")
    return folder


def _run_script(script: Path, args: list[str], what: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("NO_LOCAL_GGUF", None)  # the scripts must import their own gguf-py, not an installed gguf
    try:
        proc = subprocess.run(
            [sys.executable, str(script), *args],
            cwd=script.parent,
            env=env,
            capture_output=True,
            text=True,
            timeout=CONVERT_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ConversionFailed(f"{what}: {script.name} ran longer than {CONVERT_TIMEOUT_S:.0f} s") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-LOG_TAIL_LINES:])
        raise ConversionFailed(f"{what}: {script.name} exited with {proc.returncode}:\n{tail}")


def _atomic_output(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    return final.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{final.name}")


def refuse_router(adapter_dir: Path, runtime: str) -> None:
    """Raise ``RuntimeUnavailable`` for an adapter with a router (``plugins/shared/routing.py``): the gate
    measured it routed, and ``runtime`` cannot route (it would answer every request with the adapter)."""
    if (adapter_dir / ROUTER_FILE).is_file():
        raise RuntimeUnavailable(
            f"adapter {adapter_dir.name} has a router ({ROUTER_FILE}), which the {runtime} runtime cannot follow:"
            " serve it with deployer.runtime = \"transformers\", or train without one (trainer.route = false)"
        )


def convert_adapter(
    adapter_dir: Path, base_dir: Path, adapter_hash: str, out_root: Path, outtype: str, scripts: Path
) -> Path:
    """The GGUF LoRA of the PEFT adapter in ``adapter_dir`` (trained on the Hugging Face base in ``base_dir``),
    converted once to ``out_root/<adapter_hash>/adapter-<outtype>.gguf``."""
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ConversionFailed(f"adapter folder {adapter_dir} has no adapter_config.json: it is not a PEFT adapter")
    if not (base_dir / "config.json").is_file():
        raise ConversionFailed(
            f"base model folder {base_dir} has no config.json: the adapter's base must be a Hugging Face folder"
        )
    final = out_root / adapter_hash / f"adapter-{outtype}.gguf"
    if final.is_file():
        os.utime(final.parent)  # most recently used: kept longest by prune_adapters
        return final
    tmp = _atomic_output(final)
    try:
        _run_script(
            scripts / "convert_lora_to_gguf.py",
            ["--outfile", str(tmp), "--outtype", outtype, "--base", str(base_dir), str(adapter_dir)],
            f"converting adapter {adapter_dir} to a GGUF LoRA",
        )
        if not tmp.is_file():
            raise ConversionFailed(f"converting adapter {adapter_dir}: convert_lora_to_gguf.py wrote no {tmp}")
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def _folder_key(folder: Path) -> str:
    h = hashlib.sha256(str(folder.resolve()).encode())
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        stat = path.stat()
        h.update(f"|{path.name}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def convert_base(base_dir: Path, out_root: Path, outtype: str, scripts: Path) -> Path:
    """The Hugging Face model in ``base_dir`` as a GGUF file, converted once to ``out_root``."""
    if not (base_dir / "config.json").is_file():
        raise ConversionFailed(f"base model folder {base_dir} has no config.json: it is not a Hugging Face model")
    final = out_root / f"{base_dir.name}-{_folder_key(base_dir)}-{outtype}.gguf"
    if final.is_file():
        return final
    tmp = _atomic_output(final)
    try:
        _run_script(
            scripts / "convert_hf_to_gguf.py",
            ["--outfile", str(tmp), "--outtype", outtype, str(base_dir)],
            f"converting base model {base_dir} to GGUF",
        )
        if not tmp.is_file():
            raise ConversionFailed(f"converting base model {base_dir}: convert_hf_to_gguf.py wrote no {tmp}")
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def prune_adapters(out_root: Path, keep: int, protect: set[str]) -> list[str]:
    """Delete converted adapters beyond the ``keep`` most recently used ones, except the hashes in ``protect``
    (in service); return the hashes deleted."""
    if not out_root.is_dir():
        return []
    folders = [p for p in out_root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    folders.sort(key=lambda p: p.stat().st_mtime_ns, reverse=True)
    removed = []
    for folder in folders[keep:]:
        if folder.name in protect:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder.name)
    return removed
