"""What features register for each other to look up by name: model runtimes, rebuilders of
artifacts, dashboard pages. The hooks that register them are in ``hookspecs``; a feature finds
them through the plugin host (``host.runtimes()``, ...), never by importing another feature."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from flywheel_loop.engine.bus import Bus
    from flywheel_loop.engine.config import Settings

__all__ = [
    "DashboardPage",
    "NothingToRebuild",
    "Rebuilder",
    "Runtime",
    "RuntimeFactory",
    "RuntimeUnavailable",
    "ServedModel",
]


# --------------------------------------------------------------------------- runtimes


class RuntimeUnavailable(RuntimeError):
    """The runtime is missing, not running, or refused the model; the message says which, in a
    sentence a user can act on ("Ollama is not running at http://127.0.0.1:11434: start it with
    `ollama serve`")."""


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
    """A local runtime that serves a base model with (or without) a LoRA adapter under a model
    name, through an OpenAI-compatible endpoint where it has one. The deployer calls
    ``prepare`` (convert, upload: may be slow, no traffic yet), ``serve``, ``smoke_test`` through
    ``generate`` and ``stop``. Two optional methods, found with ``getattr``: ``retire(model)``
    deletes what ``prepare`` created for a version no longer kept, ``close()`` stops everything
    the runtime started when the engine stops. Any of them raises ``RuntimeUnavailable`` and
    leaves nothing half-created behind."""

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


@dataclass(frozen=True)
class RuntimeFactory:
    """A runtime by name (``deployer.runtime``) and how to build it from the settings."""

    name: str
    make: Callable[[Settings], Runtime]
    description: str = ""


# --------------------------------------------------------------------------- rebuilders


class NothingToRebuild(LookupError):
    """The log up to the position holds nothing to build the artifact from; the message says why."""


@dataclass(frozen=True)
class Rebuilder:
    """An artifact ``flywheel replay`` can rebuild from the log alone: ``rebuild(settings, bus,
    key, until)`` returns (hash, folder) of the artifact ``key`` as of log position ``until``, or
    raises ``NothingToRebuild``."""

    kind: str
    rebuild: Callable[[Settings, Bus, str, int], Awaitable[tuple[str, Path]]]
    description: str = ""


# --------------------------------------------------------------------------- dashboard


@dataclass(frozen=True)
class DashboardPage:
    """A table page of the web dashboard at ``/pages/<path>``: ``rows(settings)`` returns the
    column names and the rows, read from the plugin's own projections."""

    path: str
    title: str
    rows: Callable[[Settings], tuple[Sequence[str], Sequence[Sequence[Any]]]]
    description: str = ""

    def __post_init__(self) -> None:
        if not self.path or not self.path.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"dashboard page path {self.path!r}: letters, digits, '-' and '_' only")
