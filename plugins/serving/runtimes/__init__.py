"""The runtimes the serving feature brings: a transformers + PEFT server (the fallback that
always works), llama.cpp and Ollama. Each is registered by name (``register_runtimes``) like a
third party's would be; the contract (``Runtime``, ``ServedModel``, ``RuntimeUnavailable``) is
in ``flywheel_loop.engine.extensions``."""

from __future__ import annotations

from flywheel_loop.engine.config import Settings
from flywheel_loop.engine.extensions import Runtime, RuntimeFactory

__all__ = ["RUNTIMES"]


def _transformers(settings: Settings) -> Runtime:
    from flywheel_loop.plugins.serving.runtimes.transformers_server import TransformersRuntime

    return TransformersRuntime(settings)


def _llama_cpp(settings: Settings) -> Runtime:
    from flywheel_loop.plugins.serving.runtimes.llama_cpp import LlamaCppRuntime

    return LlamaCppRuntime(settings)


def _ollama(settings: Settings) -> Runtime:
    from flywheel_loop.plugins.serving.runtimes.ollama import OllamaRuntime

    return OllamaRuntime(settings)


RUNTIMES = (
    RuntimeFactory("transformers", _transformers, "the base model with the PEFT adapter, served from the engine"),
    RuntimeFactory("llama_cpp", _llama_cpp, "a GGUF base and a GGUF LoRA, one llama.cpp server per version"),
    RuntimeFactory("ollama", _ollama, "a model created in Ollama FROM the base with the adapter"),
)
