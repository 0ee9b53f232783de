"""Local runtimes a deployer can put a model in service on: llama.cpp, Ollama, and a
transformers + PEFT server as the fallback that always works.

A runtime serves a base model with (or without) a LoRA adapter under a model name, through an
OpenAI-compatible HTTP endpoint on localhost where the runtime has one. The deployer
(``plugins/deployer.py``) calls ``prepare`` (convert, upload: may be slow, no traffic yet),
``serve`` (start answering), ``smoke_test`` (one short generation before traffic moves) and
``stop``. Two optional methods, found with ``getattr``: ``retire(model)`` deletes what ``prepare``
created for a version no longer kept (Ollama's models), ``close()`` stops everything the runtime
started when the engine stops. Any of them raises ``RuntimeUnavailable`` with a sentence a user can act on ("Ollama is
not running at http://127.0.0.1:11434: start it with `ollama serve`"), and leaves nothing
half-created behind.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

__all__ = ["Runtime", "RuntimeUnavailable", "ServedModel"]


class RuntimeUnavailable(RuntimeError):
    """The runtime is missing, not running, or refused the model; the message says which."""


@dataclass(frozen=True)
class ServedModel:
    """What to serve: a base model (a Hugging Face folder) and optionally a PEFT adapter folder
    (``adapter_config.json`` + ``adapter_model.safetensors`` + ``lineage.json``, as the trainer
    stores it under ``<state_dir>/adapters/<hash>``)."""

    role: str
    model_name: str
    base_model_dir: Path
    adapter_dir: Path | None = None
    adapter_hash: str | None = None


class Runtime(Protocol):
    name: str

    def prepare(self, model: ServedModel) -> None:
        """Make the runtime able to serve ``model`` (convert, upload, create); no traffic yet."""

    def serve(self, model: ServedModel, port: int = 0) -> str:
        """Start answering for ``model``; return its OpenAI-compatible base URL (``.../v1``). ``port``
        asks for a port (the one recorded before a restart) where the runtime picks ports; 0 = any
        free one. A taken port raises ``RuntimeUnavailable``."""

    def generate(self, model: ServedModel, prompt: str, max_tokens: int = 64, temperature: float = 0.0) -> str:
        """One chat completion from the served model (used by the smoke test and the demo)."""

    def stop(self, model: ServedModel) -> None:
        """Stop serving ``model`` (idempotent)."""
