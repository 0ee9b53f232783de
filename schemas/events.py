"""The event catalogue: one payload class per event type (see shared/design.md).

Agents publish the three intake events (``interaction.recorded``, ``feedback.given``,
``outcome.observed``) on the raw stream, which has a short retention; everything derived
from them lives on the log. Text fields are bounded so one runaway agent cannot fill the
log; a value over a bound is rejected with a message naming the field.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from flywheel_loop.schemas.envelope import EventId, Payload, Stream
from flywheel_loop.schemas.personal import PERSONAL

__all__ = [
    "ArmSelected",
    "Part",
    "GitContext",
    "Context",
    "ToolCall",
    "Tokens",
    "GatewayCall",
    "InteractionRecorded",
    "FeedbackGiven",
    "OutcomeObserved",
    "Findings",
    "InteractionAnonymized",
    "FeedbackAnonymized",
    "OutcomeAnonymized",
    "QualityAssessed",
    "TrainingRequested",
    "BalanceRow",
    "DatasetBuilt",
    "DatasetSkipped",
    "TrainingStarted",
    "TrainingProgressed",
    "TrainingCompleted",
    "TrainingFailed",
    "GateCheck",
    "SuiteResults",
    "EvaluationProgressed",
    "EvaluationCompleted",
    "DeploymentCompleted",
    "DeploymentFailed",
    "DeploymentRolledBack",
    "RollbackRequested",
    "CanaryPassed",
    "DriftDetected",
    "EventRejected",
    "DataForgotten",
    "DatasetSuperseded",
    "AdapterSuperseded",
    "SamplingRequested",
    "AttemptsSampled",
    "SamplingCompleted",
]

Text = Annotated[str, StringConstraints(max_length=200_000)]
ShortText = Annotated[str, StringConstraints(max_length=2_000)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=200)]
Role = Annotated[
    str,
    StringConstraints(pattern=r"^[a-z][a-z0-9_-]{0,31}$"),
    Field(description="the agent role: coder, fixer, judge, tester, reviewer, ..."),
]
Hash = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{16,64}$")]
Score = Annotated[float, Field(ge=0.0, le=1.0)]
Count = Annotated[int, Field(ge=0)]
Scalar = float | int | str | bool | None
Complexity = Literal["simple", "moderate", "complex", "expert"]
#: free text that can carry a person's words: sealed on the log under its data subject's key
PersonalText = Annotated[Text, PERSONAL]


class Part(BaseModel):
    """A strict, immutable piece of a payload."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- intake


class GitContext(Part):
    repo: ShortText | None = None
    branch: ShortText | None = None
    commit: ShortText | None = None


class Context(Part):
    """Where the interaction happened."""

    project: Annotated[ShortText | None, PERSONAL] = None
    language: ShortText | None = None
    files: Annotated[list[ShortText], PERSONAL] = Field(default_factory=list, max_length=200)
    git: Annotated[GitContext | None, PERSONAL] = None
    build: Annotated[ShortText | None, PERSONAL] = None
    tests: Annotated[Text | None, PERSONAL] = Field(default=None, description="test code the answer must pass, if any")
    extra: Annotated[Text | None, PERSONAL] = Field(default=None, description="any other context the agent saw")


class ToolCall(Part):
    name: Name
    arguments: PersonalText = ""
    output: PersonalText = ""
    duration_ms: Annotated[float, Field(ge=0)] | None = None


class Tokens(Part):
    prompt: Count = 0
    completion: Count = 0


class GatewayCall(Part):
    """What the gateway knows about a call it served and recorded; absent when an agent recorded the interaction
    itself (SDK, raw NATS). ``served_version`` is what the drift monitor and the canary decision credit."""

    served_version: Name = Field(description="the version (or upstream model) that answered; also the model_id")
    requested: Name = Field(description="the model name the agent asked for: a role, a pinned version, an upstream")
    upstream: ShortText = Field(description="the base URL the call was forwarded to")
    api: Literal["openai.chat", "openai.completions", "anthropic.messages"]
    stream: bool = False
    status: Literal["ok", "failed"] = "ok"
    http_status: Annotated[int, Field(ge=100, le=599)] | None = None
    error: ShortText | None = Field(default=None, description="why a failed call failed")
    ttft_ms: Annotated[float, Field(ge=0)] | None = Field(
        default=None, description="time to the first token of a streamed answer (a whole one has duration_ms)"
    )
    canary: bool = Field(default=False, description="the session was on the canary side of a split")
    key: Name | None = Field(default=None, description="the name of the API key that made the call")


class InteractionRecorded(Payload):
    """One turn of a coding agent: what it was asked, what it answered, and its context."""

    event_type: ClassVar[str] = "interaction.recorded"
    stream: ClassVar[Stream] = "raw"

    session_id: Name
    user_id: Name | None = None
    role: Role
    model_id: Name
    prompt_variant: Name | None = None
    input: PersonalText
    output: PersonalText
    context: Context = Field(default_factory=Context)
    tool_calls: list[ToolCall] = Field(default_factory=list, max_length=500)
    duration_ms: Annotated[float, Field(ge=0)] | None = None
    tokens: Tokens = Field(default_factory=Tokens)
    cost_usd: Annotated[float, Field(ge=0)] | None = None
    complexity: Complexity | None = None
    domain: Name | None = None
    gateway: GatewayCall | None = Field(default=None, description="set when the gateway recorded the call")

    @property
    def served_version(self) -> str:
        """The version credited with this interaction: the one the gateway saw serve it, else the agent's word."""
        return self.gateway.served_version if self.gateway is not None else self.model_id


class FeedbackGiven(Payload):
    """What the human (or the agent on its behalf) said or did about an interaction."""

    event_type: ClassVar[str] = "feedback.given"
    stream: ClassVar[Stream] = "raw"

    interaction_id: EventId
    rating: Annotated[int, Field(ge=1, le=5)] | None = None
    thumbs: Literal["up", "down"] | None = None
    comment: Annotated[Text | None, PERSONAL] = None
    correction: Annotated[Text | None, PERSONAL] = Field(default=None, description="the corrected output")
    implicit: Literal["accepted", "modified", "rejected", "abandoned"] | None = None
    final_version: Annotated[Text | None, PERSONAL] = None
    time_to_accept_s: Annotated[float, Field(ge=0)] | None = None


class OutcomeObserved(Payload):
    """What happened when the answer met reality: build, tests, linters, deployment."""

    event_type: ClassVar[str] = "outcome.observed"
    stream: ClassVar[Stream] = "raw"

    interaction_id: EventId
    compiles: bool | None = None
    tests_passed: Count | None = None
    tests_failed: Count | None = None
    lint_errors: Count | None = None
    type_errors: Count | None = None
    runtime_errors: Count | None = None
    deployed: bool | None = None
    errors: Annotated[list[Text], PERSONAL] = Field(default_factory=list, max_length=100)


# --------------------------------------------------------------------------- scrubbed


class Findings(Part):
    """What an anonymizer replaced: kinds and counts, never the values."""

    counts: dict[Name, Count] = Field(default_factory=dict)
    anonymizers: dict[Name, Name] = Field(
        default_factory=dict, description="anonymizer name -> version"
    )


class InteractionAnonymized(Payload):
    """An interaction with PII and secrets replaced by typed placeholders; ids keyed-hashed.

    Its free text (the ``PERSONAL`` fields of ``InteractionRecorded``) is sealed on the log under the
    interaction's key; the rest (keyed hashes, role, model, tokens, cost, findings) stays readable."""

    event_type: ClassVar[str] = "interaction.anonymized"
    data_subject: ClassVar[str | None] = "interaction_id"

    interaction_id: EventId
    interaction: InteractionRecorded
    findings: Findings = Field(default_factory=Findings)


class FeedbackAnonymized(Payload):
    """Feedback with its free text (comment, correction, final version) scrubbed; that text is sealed on
    the log under the key of the interaction it is about."""

    event_type: ClassVar[str] = "feedback.anonymized"
    data_subject: ClassVar[str | None] = "feedback.interaction_id"

    feedback_id: EventId
    feedback: FeedbackGiven
    findings: Findings = Field(default_factory=Findings)


class OutcomeAnonymized(Payload):
    """An outcome with its error messages scrubbed; they are sealed on the log under the key of the
    interaction it is about."""

    event_type: ClassVar[str] = "outcome.anonymized"
    data_subject: ClassVar[str | None] = "outcome.interaction_id"

    outcome_id: EventId
    outcome: OutcomeObserved
    findings: Findings = Field(default_factory=Findings)


# --------------------------------------------------------------------------- scores


class QualityAssessed(Payload):
    """The current score of one interaction; re-emitted whenever its evidence changes."""

    event_type: ClassVar[str] = "quality.assessed"

    interaction_id: EventId
    role: Role
    model_id: Name | None = None
    prompt_variant: Name | None = None
    complexity: Complexity | None = None
    domain: Name | None = None
    cost_usd: Annotated[float, Field(ge=0)] | None = None
    duration_ms: Annotated[float, Field(ge=0)] | None = None
    scores: dict[Name, Score] = Field(description="per-dimension scores in [0, 1]")
    reward: Score
    confidence: Score
    assessors: dict[Name, Name] = Field(default_factory=dict, description="name -> version")
    evidence: list[EventId] = Field(default_factory=list, description="events the score used")
    fallbacks: list[Name] = Field(default_factory=list, description="assessors that fell back")


class ArmSelected(Payload):
    """A bandit chose a prompt variant or a model for a role; rewards are credited to it."""

    event_type: ClassVar[str] = "arm.selected"

    role: Role
    decision: Literal["prompt_variant", "model"]
    arm: Name
    policy: Name
    candidates: list[Name] = Field(default_factory=list)
    complexity: Complexity | None = None
    max_cost_per_token: Annotated[float, Field(ge=0)] | None = None


# --------------------------------------------------------------------------- training


class TrainingRequested(Payload):
    """A trigger decided that a role should be trained, and why."""

    event_type: ClassVar[str] = "training.requested"

    role: Role
    reason: Literal["volume", "quality", "schedule", "drift", "manual"]
    log_position: Count = Field(description="the last log sequence the request covers")
    examples: Count = 0
    detail: ShortText = ""


class BalanceRow(Part):
    role: Role
    domain: Name
    complexity: Name
    available: Count
    kept: Count


class DatasetBuilt(Payload):
    """A content-addressed dataset and where it came from."""

    event_type: ClassVar[str] = "dataset.built"

    role: Role
    dataset_hash: Hash
    request_id: EventId | None = None
    sizes: dict[Name, Count]
    balance: list[BalanceRow] = Field(default_factory=list)
    rehearsal_share: Score = 0.0
    lineage: list[EventId] = Field(default_factory=list, description="the ids of the events it came from")
    path: ShortText
    log_position: Count = Field(default=0, description="the last log sequence the dataset covers")
    lineage_total: Count = Field(
        default=0, description="how many ids the full lineage has (``lineage`` may list fewer; the folder has all)"
    )
    sources: dict[Name, Count] = Field(
        default_factory=dict,
        description="training rows per source: human (scored interactions and corrections), rft (verified samples),"
        " rehearsal; and DPO pairs per source (dpo_human, dpo_rft)",
    )


class DatasetSkipped(Payload):
    """A training request that produced no dataset, and why (nothing partial was written)."""

    event_type: ClassVar[str] = "dataset.skipped"

    role: Role
    request_id: EventId | None = None
    log_position: Count = 0
    reason: Literal["no_data", "no_examples", "too_few_examples", "base_model_missing", "invalid_request"]
    detail: ShortText


class TrainingStarted(Payload):
    event_type: ClassVar[str] = "training.started"

    run_id: Name
    role: Role
    dataset_hash: Hash
    base_model: ShortText
    method: Literal["sft", "dpo"] = "sft"
    hyperparameters: dict[Name, Scalar] = Field(default_factory=dict)


class TrainingProgressed(Payload):
    event_type: ClassVar[str] = "training.progressed"

    run_id: Name
    step: Count
    total_steps: Count
    epoch: Annotated[float, Field(ge=0)] = 0.0
    loss: float | None = None
    val_loss: float | None = None
    tokens_per_s: Annotated[float, Field(ge=0)] | None = None
    elapsed_s: Annotated[float, Field(ge=0)] = 0.0


class TrainingCompleted(Payload):
    event_type: ClassVar[str] = "training.completed"

    run_id: Name
    role: Role
    adapter_hash: Hash
    path: ShortText
    base_model: ShortText
    train_loss: float | None = None
    val_loss: float | None = None
    tokens_per_s: Annotated[float, Field(ge=0)] | None = None
    duration_s: Annotated[float, Field(ge=0)] = 0.0
    steps: Count = 0
    dataset_hash: Hash | None = None
    method: Literal["sft", "dpo"] = "sft"
    best_step: Count | None = Field(default=None, description="the step whose weights were kept (early stopping)")
    stopped_early: bool = False


class TrainingFailed(Payload):
    event_type: ClassVar[str] = "training.failed"

    run_id: Name
    role: Role
    reason: ShortText
    error: Text = ""


GateVerdict = Literal["passed", "failed", "inconclusive"]


class GateCheck(Part):
    """One check of the gate: its status, its figure with the interval around it and the number of
    items it rests on (none where a check has no interval)."""

    name: Name
    status: Literal["ok", "failed", "inconclusive", "reported"] = Field(
        description="reported: a figure measured and shown, not gated (the verdict does not count it)")
    detail: ShortText = ""
    value: float | None = None
    low: float | None = None
    high: float | None = None
    items: Count | None = None
    p_value: Annotated[float, Field(ge=0, le=1)] | None = None


class SuiteResults(Part):
    """Which coding-suite problems an evaluation ran and which each side solved: the evidence the next
    evaluations draw their focused sample from (``evaluator.suite_focus``)."""

    suite: Name
    service: ShortText = Field(description="the model in service: its adapter hash, or the base model's name")
    problems: list[Name] = Field(default_factory=list, max_length=5000)
    candidate_solved: list[Name] = Field(default_factory=list, max_length=5000)
    service_solved: list[Name] = Field(default_factory=list, max_length=5000)
    focused: bool = Field(default=False, description="drawn first from the problems the model in service was"
                          " known to solve")


class EvaluationProgressed(Payload):
    """An evaluation under way: which step of the gate runs and how far it got (live, best effort)."""

    event_type: ClassVar[str] = "evaluation.progressed"

    run_id: Name
    role: Role
    step: ShortText = Field(description="what is measured now, e.g. 'suite coding_suite (candidate)'")
    done: Count = 0
    total: Count = 0
    steps_done: Count = Field(default=0, description="steps of the evaluation finished before this one")
    steps_total: Count = 0
    elapsed_s: Annotated[float, Field(ge=0)] = 0.0


class EvaluationCompleted(Payload):
    """The gate's verdict on a candidate adapter against the model in service."""

    event_type: ClassVar[str] = "evaluation.completed"

    run_id: Name
    role: Role
    adapter_hash: Hash | None = None
    candidate: dict[Name, Scalar] = Field(default_factory=dict)
    baseline: dict[Name, Scalar] = Field(default_factory=dict)
    passed: bool = Field(description="true only for the verdict 'passed'")
    reasons: list[ShortText] = Field(default_factory=list)
    verdict: GateVerdict | None = Field(
        default=None, description="passed, failed or inconclusive; none on events written before the three-way"
        " gate (read `passed`)",
    )
    checks: list[GateCheck] = Field(default_factory=list, max_length=50)
    suite_results: SuiteResults | None = Field(default=None, description="the suite problems run and solved")

    @property
    def outcome(self) -> GateVerdict:
        """The verdict, also for an event written before the three-way gate."""
        if self.verdict is not None:
            return self.verdict
        return "passed" if self.passed else "failed"

    @model_validator(mode="after")
    def _passed_matches_verdict(self) -> EvaluationCompleted:
        if self.verdict is not None and self.passed != (self.verdict == "passed"):
            raise ValueError(f"passed={self.passed} contradicts verdict {self.verdict!r}")
        return self


# --------------------------------------------------------------------------- serving


RuntimeName = Annotated[
    str,
    StringConstraints(min_length=1, max_length=200),
    Field(description="where the model is served: transformers, llama_cpp, ollama, ..."),
]


class DeploymentCompleted(Payload):
    """A version of a role's model is in service: it passed its evaluation and a smoke test."""

    event_type: ClassVar[str] = "deployment.completed"

    role: Role
    runtime: RuntimeName
    model_name: Name = Field(description="the name agents ask for: <role>-<adapter hash[:12]>")
    adapter_hash: Hash | None = None
    evaluation_id: EventId | None = Field(default=None, description="the evaluation.completed that passed it")
    traffic_share: Score = Field(
        default=1.0, description="its share of the role's traffic; the previous version keeps the rest"
    )
    endpoint: ShortText | None = Field(default=None, description="OpenAI-compatible base URL (.../v1)")
    previous_model_name: Name | None = Field(default=None, description="the version it replaces, if any")
    previous_adapter_hash: Hash | None = None
    kept: list[Name] = Field(
        default_factory=list, max_length=100, description="the versions kept for rollback, newest first"
    )


class DeploymentFailed(Payload):
    """A deployment or a rollback that did not happen, and why; nothing changed in service."""

    event_type: ClassVar[str] = "deployment.failed"

    role: Role
    runtime: RuntimeName
    adapter_hash: Hash | None = None
    reason: ShortText
    model_name: Name | None = None
    evaluation_id: EventId | None = None


class DeploymentRolledBack(Payload):
    """A role's version in service was replaced by the one before it (drift or by hand)."""

    event_type: ClassVar[str] = "deployment.rolled_back"

    role: Role
    runtime: RuntimeName
    from_adapter: Hash | None = None
    to_adapter: Hash | None = None
    reason: ShortText
    from_model_name: Name | None = None
    to_model_name: Name | None = None
    trigger: Literal["drift", "manual", "forgotten"] | None = None
    endpoint: ShortText | None = Field(default=None, description="where the restored version answers (.../v1)")


class RollbackRequested(Payload):
    """Someone asked to put a role's previous version back in service (``flywheel rollback``)."""

    event_type: ClassVar[str] = "rollback.requested"

    role: Role
    reason: ShortText = "requested with flywheel rollback"
    requested_by: Name = "cli"


class CanaryPassed(Payload):
    """A canary (a version taking part of a role's traffic) earned, over a full window, no less reward than the
    version it shares the traffic with: it may take all of it."""

    event_type: ClassVar[str] = "canary.passed"

    role: Role
    model_name: Name
    previous_model_name: Name | None = None
    deployment_id: EventId | None = Field(default=None, description="the deployment that made it a canary")
    metric: Name = "reward_mean"
    window: Count
    baseline_value: float
    current_value: float
    p_value: Score | None = None


class DriftDetected(Payload):
    """The version in service earns less reward than the one before it, beyond chance."""

    event_type: ClassVar[str] = "drift.detected"

    role: Role
    metric: Name
    window: Count
    baseline_value: float
    current_value: float
    drop: float = Field(description="relative drop: (baseline_value - current_value) / baseline_value")
    p_value: Score | None = None
    evidence: list[EventId] = Field(default_factory=list)
    model_name: Name | None = Field(default=None, description="the version in service that drifted")
    previous_model_name: Name | None = Field(default=None, description="the version it was compared with")
    deployment_id: EventId | None = Field(
        default=None, description="the deployment (or rollback) event that put it in service"
    )


# --------------------------------------------------------------------------- runtime


class EventRejected(Payload):
    """A message that could not be processed; the original stays where it was."""

    event_type: ClassVar[str] = "event.rejected"

    subject: ShortText
    stream_name: Name
    sequence: Count
    processor: Name
    reason: Text
    attempts: Count = 1
    original_id: ShortText | None = None

    @field_validator("reason")
    @classmethod
    def _reason_not_empty(cls, reason: str) -> str:
        if not reason.strip():
            raise ValueError("a rejection needs a reason")
        return reason


# --------------------------------------------------------------------------- data protection

#: The most ids one ``data.forgotten`` lists; ``flywheel forget`` splits a larger subject into several.
FORGOTTEN_IDS_MAX = 10_000


class DataForgotten(Payload):
    """A data subject was forgotten; every consumer drops what it kept of it.

    Published by ``flywheel forget`` after the subject's messages were erased from the raw
    stream and the keys of its interactions destroyed: the anonymized events stay on the
    immutable log, but their personal fields were sealed under those keys, so nothing readable
    of the subject is left there (``counts["keys_destroyed"]``). Every consumer (projections, the
    evidence store, vectors, datasets) deletes its rows for the listed interactions and ignores
    them from then on, also when it replays the log. The subject is named by its keyed hash (the
    anonymizer's pseudonym), never by the raw id.
    """

    event_type: ClassVar[str] = "data.forgotten"

    subject: Literal["session", "user"]
    subject_hash: Name = Field(description="the anonymizer's keyed hash of the session or user id")
    interaction_ids: list[EventId] = Field(
        default_factory=list, max_length=FORGOTTEN_IDS_MAX, description="the forgotten interactions"
    )
    event_ids: list[EventId] = Field(
        default_factory=list,
        max_length=FORGOTTEN_IDS_MAX,
        description="log events about them: *.anonymized and quality.assessed",
    )
    counts: dict[Name, Count] = Field(
        default_factory=dict, description="raw messages deleted, interactions, feedback, outcomes, scores"
    )
    part: Annotated[int, Field(ge=1)] = Field(default=1, description="this event's part of one request")
    parts: Annotated[int, Field(ge=1)] = 1
    reason: ShortText = ""
    requested_by: Name | None = None


class DatasetSuperseded(Payload):
    """A dataset rebuilt without forgotten data; the old folder is gone.

    The replacement covers the same log position with the forgotten interactions left out
    (``new_hash`` is None when nothing buildable was left). It is announced here rather than
    by a second ``dataset.built``, so no trigger or trainer takes it for a new request.
    """

    event_type: ClassVar[str] = "dataset.superseded"

    role: Role
    old_hash: Hash
    new_hash: Hash | None = None
    forgotten_id: EventId = Field(description="the data.forgotten event that caused the rebuild")
    log_position: Count = Field(default=0, description="the log position both datasets cover")
    removed: Count = Field(default=0, description="lineage ids of the old dataset missing from the new one")
    sizes: dict[Name, Count] = Field(default_factory=dict)
    lineage: list[EventId] = Field(default_factory=list, description="the new dataset's lineage (may be capped)")
    lineage_total: Count = 0
    path: ShortText | None = None
    detail: ShortText = ""


class AdapterSuperseded(Payload):
    """An adapter trained on a dataset that held forgotten data, and what was decided about it.

    The deployer publishes one for every adapter trained on a superseded dataset. ``action``:

    - ``retrain``: the adapter is in service; the trainer trains the replacement dataset and the new
      adapter goes through the gate as any other (``deployer.on_forgotten = "retrain"``);
    - ``rollback``: the adapter was in service; the deployer put back the newest version not trained on
      forgotten data, or the base model (``deployer.on_forgotten = "rollback"``, and ``retrain`` when
      nothing was left to retrain on);
    - ``withdraw``: not in service; it is no longer a rollback target.
    """

    event_type: ClassVar[str] = "adapter.superseded"

    role: Role
    adapter_hash: Hash
    model_name: Name | None = Field(default=None, description="the version's name, when it was deployed")
    dataset_hash: Hash = Field(description="the superseded dataset it was trained on")
    new_dataset_hash: Hash | None = Field(default=None, description="the dataset that replaced it, if any")
    new_dataset_path: ShortText | None = None
    superseded_id: EventId = Field(description="the dataset.superseded event")
    forgotten_id: EventId | None = Field(default=None, description="the data.forgotten behind it")
    in_service: bool = False
    action: Literal["retrain", "rollback", "withdraw"]
    detail: ShortText = ""


# --------------------------------------------------------------------------- verified attempts (RFT)


class SamplingRequested(Payload):
    """Someone (``flywheel train --method rft``, a trigger) asked the sampler to sample a role's recorded tasks."""

    event_type: ClassVar[str] = "sampling.requested"

    role: Role
    reason: Literal["volume", "schedule", "manual"] = "manual"
    log_position: Count = Field(description="the last log sequence whose tasks may be sampled")
    k: Annotated[int, Field(ge=1, le=64)] | None = Field(default=None, description="answers per task; none: settings")
    temperature: Annotated[float, Field(ge=0, le=5)] | None = None
    max_tasks: Annotated[int, Field(ge=1)] | None = None
    seed: int | None = None
    detail: ShortText = ""


class AttemptsSampled(Payload):
    """k answers sampled from the model in service for one recorded task, each run against the task's tests.

    The answers are on the log, sealed under the task's interaction key like the interaction itself:
    the dataset builder rebuilds its RFT rows from the log alone, and forgetting the task's subject
    shreds its sampled answers too."""

    event_type: ClassVar[str] = "attempts.sampled"
    data_subject: ClassVar[str | None] = "interaction_id"

    role: Role
    request_id: EventId = Field(description="the sampling.requested this round answers")
    interaction_id: EventId = Field(description="the recorded task (interaction.anonymized's interaction)")
    task_event_id: EventId = Field(description="the interaction.anonymized event the task came from")
    model_version: Name = Field(description="what answered: the base model or the adapter hash in service")
    k: Annotated[int, Field(ge=1, le=64)]
    passed: Count
    temperature: Annotated[float, Field(ge=0, le=5)]
    seed: int
    hashes: list[Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]] = Field(
        max_length=64, description="sha256 of each answer, in sampling order"
    )
    verdicts: list[bool] = Field(max_length=64, description="whether each answer passed every test")
    timed_out: Count = Field(default=0, description="answers killed by the sandbox's time or resource limits")
    answers: Annotated[list[Text], PERSONAL] = Field(default_factory=list, max_length=64)


class SamplingCompleted(Payload):
    """A sampling round is over: its figures (pass@k of the sampler). The dataset builder builds the
    role's dataset at this event's position, with the round's passing answers."""

    event_type: ClassVar[str] = "sampling.completed"

    role: Role
    request_id: EventId
    model_version: Name
    tasks: Count = Field(description="tasks sampled")
    samples: Count = Field(description="answers generated")
    passed_samples: Count
    solved_tasks: Count = Field(description="tasks with at least one passing answer")
    pass_at_1: Score = Field(description="unbiased pass@1 over the sampled tasks")
    pass_at_k: Score = Field(description="share of tasks with a passing answer among k")
    k: Count
    temperature: Annotated[float, Field(ge=0, le=5)]
    seconds: Annotated[float, Field(ge=0)] = 0.0
    detail: ShortText = ""
