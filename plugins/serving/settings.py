"""The serving feature's settings: ``[deployer]``, ``[drift]``, ``[ollama]``, ``[llama_cpp]`` and ``[bandit]``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import AfterValidator, Field

from flywheel_loop.engine.config import PluginSection
from flywheel_loop.sdk.bandit import BanditConfig


def _http_base(value: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise ValueError("must start with http:// or https://")
    return value.rstrip("/")


#: an HTTP(S) base URL, without its trailing slash
HttpBase = Annotated[str, AfterValidator(_http_base)]


class OllamaConfig(PluginSection):
    """The Ollama runtime (``deployer.runtime = "ollama"``): where it listens and how it samples."""

    section_name: ClassVar[str] = "ollama"

    url: HttpBase = Field(default="http://127.0.0.1:11434", description="Ollama's HTTP API")
    base: str | None = Field(
        default=None,
        description="an Ollama model to build versions FROM (e.g. qwen2.5-coder:1.5b); none = the trainer's"
        " base model, uploaded once (the bundled SmolLM2 GGUF, or a Hugging Face folder's safetensors)",
    )
    temperature: float = Field(default=0.0, ge=0, le=2, description="PARAMETER temperature of created models")
    top_p: float = Field(default=0.9, gt=0, le=1, description="PARAMETER top_p")
    top_k: int = Field(default=40, ge=1, description="PARAMETER top_k")
    timeout_s: float = Field(default=300.0, gt=0, description="longest wait for one API call (uploads, create)")


class LlamaCppConfig(PluginSection):
    """The llama.cpp runtime (``deployer.runtime = "llama_cpp"``, ``plugins/runtimes/llama_cpp.py``): the base
    model as GGUF, each adapter converted to a GGUF LoRA, one llama-cpp-python server per served version.
    Needs the wheel ``bash ops/build-llama-cpp`` builds (AMX compiled out) and ``bash ops/setup`` installs."""

    section_name: ClassVar[str] = "llama_cpp"

    base_gguf: Path | None = Field(
        default=None,
        description="the base model as a GGUF file; none = the bundled SmolLM2 GGUF when the base model is its"
        " conversion, else the base folder converted once with llama.cpp's convert_hf_to_gguf.py",
    )
    base_outtype: Literal["f32", "f16", "bf16", "q8_0"] = Field(
        default="f16", description="weight type when a Hugging Face base folder is converted to GGUF"
    )
    lora_outtype: Literal["f32", "f16", "bf16", "q8_0"] = Field(
        default="f16", description="weight type of converted GGUF LoRA adapters"
    )
    threads: int = Field(
        default=1,
        ge=1,
        description="generation threads per server (servers run with OMP_WAIT_POLICY=passive; on 2 shared cores"
        " one thread is fastest)",
    )
    n_ctx: int = Field(default=2048, ge=64, description="context window of a served model, in tokens")
    no_repack: bool = Field(
        default=False,
        description="turn ggml's extra buffer types off (use_extra_bufts=false, llama-server's --no-repack):"
        " the workaround for a build that still crashes in a repacked matrix path",
    )
    startup_timeout_s: float = Field(default=120.0, gt=0, description="longest wait for a server to answer")
    request_timeout_s: float = Field(default=300.0, gt=0, description="longest wait for one generation")
    scripts_dir: Path | None = Field(
        default=None,
        description="llama.cpp's conversion scripts (convert_lora_to_gguf.py, convert_hf_to_gguf.py, gguf-py);"
        " none = the copy ops/build-llama-cpp keeps in ${FLYWHEEL_CACHE:-~/.cache/flywheel}/llama.cpp-<version>",
    )


class DeployerConfig(PluginSection):
    """How ``deployer`` puts a version that passed its evaluation in service (``plugins/deployer.py``)."""

    section_name: ClassVar[str] = "deployer"

    runtime: str = Field(
        default="transformers",
        min_length=1,
        description="a registered runtime: transformers (PEFT on the HF base model, always works), llama_cpp,"
        " ollama, or one a plugin adds (flywheel plugins lists them)",
    )
    canary_share: float = Field(
        default=1.0,
        gt=0,
        le=1,
        description="share of the role's traffic the new version gets; the previous version keeps serving the"
        " rest (1.0: all traffic moves once the smoke test passes)",
    )
    on_inconclusive: Literal["canary", "refuse"] = Field(
        default="canary",
        description="an evaluation whose verdict is inconclusive (the gate could not tell): canary = deploy it"
        " at inconclusive_share of the traffic beside the version in service and let production reward decide"
        " (canary.passed promotes it, drift rolls it back); refuse = deployment.failed, nothing changes",
    )
    inconclusive_share: float = Field(
        default=0.1, gt=0, lt=1, description="the traffic share of a canary deployed on an inconclusive verdict"
    )
    keep_versions: int = Field(
        default=3, ge=2, le=100, description="versions kept for rollback, the one in service included"
    )
    on_forgotten: Literal["rollback", "retrain"] = Field(
        default="rollback",
        description="a version in service trained on data that was then forgotten (its dataset superseded):"
        " rollback = put back at once the newest version not trained on it (or the base model); retrain = keep"
        " it in service while the trainer trains the replacement dataset, which goes through the gate",
    )
    host: str = Field(default="127.0.0.1", description="interface the transformers server listens on")
    smoke_prompt: str = Field(default="Write a Python function that returns 1.", min_length=1)
    smoke_max_tokens: int = Field(default=8, ge=1, le=512)
    threads: int | None = Field(
        default=1,
        ge=1,
        description="torch threads while the transformers runtime generates; none = torch's default, every core"
        " (on 2 shared, busy cores SmolLM2-135M took 79-336 ms/token with 1 thread and 2434 ms/token with 2)",
    )
    max_batch: int = Field(
        default=16,
        ge=1,
        le=64,
        description="greedy requests to one version the transformers runtime generates together at most (requests"
        " that arrive together share each token's read of the weights); 1 = each request alone",
    )


class DriftConfig(PluginSection):
    """How ``drift_monitor`` decides the version in service got worse than the one before it."""

    section_name: ClassVar[str] = "drift"

    window: int = Field(default=20, ge=3, le=10_000, description="recent rewards compared per version")
    min_drop: float = Field(
        default=0.05, ge=0, lt=1, description="least relative drop of the mean reward (0.05 = 5 %) that counts"
    )
    alpha: float = Field(default=0.05, gt=0, lt=1, description="significance of the one-sided Mann-Whitney U test")




class BanditSection(BanditConfig, PluginSection):
    """``[bandit]``: the prompt variants and models the Selector (SDK and gateway) chooses among."""

    section_name: ClassVar[str] = "bandit"
