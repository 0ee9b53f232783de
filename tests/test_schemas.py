"""The event vocabulary: examples, JSON Schema files, validation errors, ids. No NATS needed."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from pydantic import ValidationError

import flywheel_loop.schemas.export
from flywheel_loop.schemas import (
    CATALOGUE,
    MAX_EVENT_BYTES,
    InvalidEvent,
    derived_event,
    new_event,
    new_id,
    parse_event,
    subject_for,
)
from flywheel_loop.schemas.events import FeedbackGiven, InteractionRecorded
from flywheel_loop.schemas.ids import ID_PATTERN, id_time_ms

SCHEMAS_DIR = Path(flywheel_loop.schemas.export.__file__).parent
EXAMPLES_DIR = SCHEMAS_DIR / "examples"
JSON_DIR = flywheel_loop.schemas.export.JSON_DIR
TYPES = sorted(CATALOGUE)
INTAKE = {"interaction.recorded", "feedback.given", "outcome.observed"}


def example(event_type: str) -> dict[str, Any]:
    return json.loads((EXAMPLES_DIR / f"{event_type}.json").read_text(encoding="utf-8"))


def validator(event_type: str) -> Draft202012Validator:
    return Draft202012Validator(json.loads((JSON_DIR / f"{event_type}.json").read_bytes()))


def rejection(raw: dict[str, Any] | bytes | str) -> str:
    if isinstance(raw, dict):
        raw = json.dumps(raw)
    with pytest.raises(InvalidEvent) as info:
        parse_event(raw)
    return info.value.reason


# --------------------------------------------------------------------------- files


def test_every_type_has_exactly_one_example_and_one_schema_file() -> None:
    assert len(TYPES) == 30
    examples = sorted(p.name for p in EXAMPLES_DIR.glob("*.json"))
    schema_files = sorted(p.name for p in JSON_DIR.glob("*.json"))
    expected = [f"{t}.json" for t in TYPES]
    assert examples == expected, "schemas/examples/ must hold one <type>.json per catalogue type"
    assert schema_files == expected, "schemas/json/ must hold one <type>.json per catalogue type"


def test_json_schema_files_are_not_stale() -> None:
    for name, body in flywheel_loop.schemas.export.rendered().items():
        on_disk = (JSON_DIR / name).read_bytes() if (JSON_DIR / name).exists() else b""
        assert on_disk == body, f"schemas/json/{name} is stale: run `python -m flywheel_loop.schemas.export`"


@pytest.mark.parametrize("event_type", TYPES)
def test_schema_file_is_a_valid_draft_2020_12_schema(event_type: str) -> None:
    schema = json.loads((JSON_DIR / f"{event_type}.json").read_bytes())
    Draft202012Validator.check_schema(schema)
    assert schema["properties"]["type"] == {"const": event_type, "description": "the event type"}
    assert {"id", "type", "schema_version", "time", "source", "data"} <= set(schema["required"])


# --------------------------------------------------------------------------- examples


@pytest.mark.parametrize("event_type", TYPES)
def test_example_parses_round_trips_and_matches_its_schema(event_type: str) -> None:
    raw = (EXAMPLES_DIR / f"{event_type}.json").read_bytes()
    event = parse_event(raw)
    assert event.type == event_type
    assert isinstance(event.data, CATALOGUE[event_type])
    assert event.schema_version == CATALOGUE[event_type].schema_version
    assert event.time.utcoffset() is not None and event.time.utcoffset().total_seconds() == 0
    assert parse_event(event.to_bytes()) == event
    assert parse_event(event.to_bytes()).to_bytes() == event.to_bytes()
    errors = [e.message for e in validator(event_type).iter_errors(json.loads(raw))]
    assert errors == []
    # the wire form the engine writes validates against the published schema too
    assert list(validator(event_type).iter_errors(json.loads(event.to_bytes()))) == []


@pytest.mark.parametrize("event_type", TYPES)
def test_example_is_a_full_wire_envelope(event_type: str) -> None:
    body = example(event_type)
    assert list(body) == [
        "id",
        "type",
        "schema_version",
        "time",
        "source",
        "causation_id",
        "correlation_id",
        "data",
    ]
    assert re.fullmatch(ID_PATTERN, body["id"]), f"{event_type}: id is not a ULID"
    assert re.fullmatch(ID_PATTERN, body["correlation_id"]), f"{event_type}: correlation_id"
    if event_type in ("interaction.recorded", "arm.selected", "data.forgotten"):
        # an interaction (or an agent's choice, or an operator's forget) starts a story
        assert body["causation_id"] is None
    else:
        assert re.fullmatch(ID_PATTERN, body["causation_id"]), f"{event_type}: causation_id"
    assert body["time"].endswith("Z")


_SECRET_OR_PII = {
    "email": re.compile(r"[\w.+-]+@[\w-]+\.[\w.-]+"),
    "openai-style key": re.compile(r"\bsk-[A-Za-z0-9_-]{16,}"),
    "aws key": re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
    "github token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{20,}"),
    "jwt": re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "password assignment": re.compile(r"(?i)\b(password|passwd|secret|api_key)\s*[=:]\s*\S"),
    "phone number": re.compile(r"\+\d{1,3}[ -]?\(?\d{2,4}\)?[ -]?\d{3,4}[ -]?\d{3,4}"),
    "ip address": re.compile(r"\b\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}\b"),
}


@pytest.mark.parametrize("event_type", TYPES)
def test_examples_carry_no_secret_or_pii_shaped_strings(event_type: str) -> None:
    for text in _strings(example(event_type)):
        for kind, pattern in _SECRET_OR_PII.items():
            found = pattern.search(text)
            assert not found, f"{event_type} example holds a {kind}-shaped string: {found}"


def _strings(value: Any) -> list[str]:
    """Every key and string value in a decoded JSON document."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in [k, *_strings(v)]]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def test_anonymized_examples_show_placeholders_and_link_to_their_raw_event() -> None:
    raw_ids = {t: example(t)["id"] for t in INTAKE}
    links = {
        "interaction.anonymized": ("interaction_id", "interaction.recorded"),
        "feedback.anonymized": ("feedback_id", "feedback.given"),
        "outcome.anonymized": ("outcome_id", "outcome.observed"),
    }
    for anon_type, (field, raw_type) in links.items():
        body = example(anon_type)
        assert body["data"][field] == raw_ids[raw_type]
        assert body["causation_id"] == raw_ids[raw_type]
        assert body["correlation_id"] == raw_ids["interaction.recorded"]
        assert re.search(r"\[[A-Z_]+\]", json.dumps(body["data"])), f"{anon_type}: no placeholder"
        assert body["data"]["findings"]["counts"], f"{anon_type}: findings are empty"


def test_intake_examples_tell_one_story() -> None:
    interaction = example("interaction.recorded")
    assert interaction["data"]["role"] == "coder"
    assert "def test_" in interaction["data"]["context"]["tests"]
    assert interaction["correlation_id"] == interaction["id"]
    for event_type in ("feedback.given", "outcome.observed"):
        body = example(event_type)
        assert body["data"]["interaction_id"] == interaction["id"]
        assert body["causation_id"] == interaction["id"]
        assert body["correlation_id"] == interaction["id"]
    assert example("feedback.given")["data"]["correction"]
    outcome = example("outcome.observed")["data"]
    assert outcome["tests_passed"] + outcome["tests_failed"] > 0


# --------------------------------------------------------------------------- invalid variants


def _required_data_fields(event_type: str) -> list[str]:
    return [n for n, f in CATALOGUE[event_type].model_fields.items() if f.is_required()]


@pytest.mark.parametrize("event_type", TYPES)
def test_unknown_data_field_is_rejected_by_name(event_type: str) -> None:
    body = example(event_type)
    body["data"]["surprise_field"] = 1
    assert "data.surprise_field" in rejection(body)
    assert not validator(event_type).is_valid(body)


@pytest.mark.parametrize("event_type", TYPES)
def test_unknown_envelope_field_is_rejected_by_name(event_type: str) -> None:
    body = example(event_type)
    body["priority"] = "high"
    assert "priority" in rejection(body)
    assert not validator(event_type).is_valid(body)


@pytest.mark.parametrize(
    ("event_type", "field"),
    [(t, f) for t in TYPES for f in _required_data_fields(t)],
)
def test_missing_required_data_field_is_rejected_by_name(event_type: str, field: str) -> None:
    body = example(event_type)
    del body["data"][field]
    reason = rejection(body)
    assert f"data.{field}" in reason and "required" in reason.lower()
    assert not validator(event_type).is_valid(body)


def test_every_type_has_a_required_data_field() -> None:
    assert all(_required_data_fields(t) for t in TYPES)


@pytest.mark.parametrize("event_type", TYPES)
@pytest.mark.parametrize(
    "bad_id",
    ["not-a-ulid", "01JWV2NPEMR9GHS6JPVT4C4M0", "01jwv2npemr9ghs6jpvt4c4m0e", "01JWV2NPEMR9GHS6JPVT4C4M0U"],
)
def test_an_id_that_is_not_a_ulid_is_rejected(event_type: str, bad_id: str) -> None:
    body = example(event_type)
    body["id"] = bad_id
    assert rejection(body).startswith("id:")
    assert not validator(event_type).is_valid(body)


@pytest.mark.parametrize("event_type", TYPES)
def test_a_causation_id_that_is_not_a_ulid_is_rejected(event_type: str) -> None:
    body = example(event_type)
    body["causation_id"] = "evt-123"
    assert rejection(body).startswith("causation_id:")


def _set(body: dict[str, Any], path: str, value: Any) -> None:
    keys = path.split(".")
    target = body
    for key in keys[:-1]:
        target = target[int(key)] if isinstance(target, list) else target[key]
    if isinstance(target, list):
        target[int(keys[-1])] = value
    else:
        target[keys[-1]] = value


TOO_LONG = "x" * 200_001
TOO_LONG_SHORT = "x" * 2_001

#: (type, path to set, bad value, what the reason must name); every type appears.
BAD_VALUES = [
    ("interaction.recorded", "data.input", TOO_LONG, "data.input"),
    ("interaction.recorded", "data.role", "Coder!", "data.role"),
    ("interaction.recorded", "data.tokens.prompt", -5, "data.tokens.prompt"),
    ("interaction.recorded", "data.context.tests", TOO_LONG, "data.context.tests"),
    ("interaction.recorded", "data.tool_calls.0.name", "", "data.tool_calls.0.name"),
    ("interaction.recorded", "data.complexity", "trivial", "data.complexity"),
    ("interaction.recorded", "data.session_id", "s" * 201, "data.session_id"),
    ("feedback.given", "data.rating", 9, "data.rating"),
    ("feedback.given", "data.rating", 0, "data.rating"),
    ("feedback.given", "data.thumbs", "sideways", "data.thumbs"),
    ("feedback.given", "data.correction", TOO_LONG, "data.correction"),
    ("feedback.given", "data.interaction_id", "interaction-1", "data.interaction_id"),
    ("outcome.observed", "data.tests_passed", -1, "data.tests_passed"),
    ("outcome.observed", "data.compiles", "maybe", "data.compiles"),
    ("outcome.observed", "data.errors", ["e"] * 101, "data.errors"),
    ("interaction.anonymized", "data.interaction.input", TOO_LONG, "data.interaction.input"),
    ("interaction.anonymized", "data.findings.counts.EMAIL", -1, "data.findings.counts.EMAIL"),
    ("feedback.anonymized", "data.feedback.rating", 6, "data.feedback.rating"),
    ("outcome.anonymized", "data.outcome.tests_failed", -2, "data.outcome.tests_failed"),
    ("quality.assessed", "data.reward", 1.5, "data.reward"),
    ("quality.assessed", "data.scores.tests", -0.1, "data.scores.tests"),
    ("quality.assessed", "data.evidence.0", "nope", "data.evidence.0"),
    ("arm.selected", "data.decision", "temperature", "data.decision"),
    ("arm.selected", "data.max_cost_per_token", -1e-6, "data.max_cost_per_token"),
    ("training.requested", "data.reason", "boredom", "data.reason"),
    ("training.requested", "data.detail", TOO_LONG_SHORT, "data.detail"),
    ("dataset.built", "data.dataset_hash", "NOT-A-HASH", "data.dataset_hash"),
    ("dataset.built", "data.rehearsal_share", 2.0, "data.rehearsal_share"),
    ("dataset.built", "data.balance.0.kept", -1, "data.balance.0.kept"),
    ("dataset.skipped", "data.reason", "bored", "data.reason"),
    ("training.started", "data.method", "rlhf", "data.method"),
    ("training.started", "data.hyperparameters.lora_r", [16], "data.hyperparameters.lora_r"),
    ("training.progressed", "data.step", -1, "data.step"),
    ("training.progressed", "data.tokens_per_s", -3.0, "data.tokens_per_s"),
    ("evaluation.progressed", "data.done", -1, "data.done"),
    ("training.completed", "data.adapter_hash", "abc", "data.adapter_hash"),
    ("training.completed", "data.path", TOO_LONG_SHORT, "data.path"),
    ("training.failed", "data.reason", TOO_LONG_SHORT, "data.reason"),
    ("training.failed", "data.error", TOO_LONG, "data.error"),
    ("evaluation.completed", "data.passed", "yes please", "data.passed"),
    ("evaluation.completed", "data.reasons.0", TOO_LONG_SHORT, "data.reasons.0"),
    ("deployment.completed", "data.traffic_share", 1.01, "data.traffic_share"),
    ("deployment.completed", "data.evaluation_id", "eval-7", "data.evaluation_id"),
    ("deployment.failed", "data.runtime", "", "data.runtime"),
    ("deployment.rolled_back", "data.to_adapter", "ZZZZ", "data.to_adapter"),
    ("drift.detected", "data.window", -200, "data.window"),
    ("drift.detected", "data.p_value", 1.2, "data.p_value"),
    ("event.rejected", "data.sequence", -1, "data.sequence"),
    ("event.rejected", "data.reason", "   ", "data.reason"),
    ("event.rejected", "data.subject", TOO_LONG_SHORT, "data.subject"),
    ("data.forgotten", "data.subject", "planet", "data.subject"),
    ("data.forgotten", "data.interaction_ids.0", "session-1", "data.interaction_ids.0"),
    ("data.forgotten", "data.counts.raw_deleted", -1, "data.counts.raw_deleted"),
    ("dataset.superseded", "data.new_hash", "NOT-A-HASH", "data.new_hash"),
    ("dataset.superseded", "data.forgotten_id", "f-1", "data.forgotten_id"),
    ("rollback.requested", "data.role", "Coder!", "data.role"),
    ("canary.passed", "data.window", -5, "data.window"),
    ("adapter.superseded", "data.action", "shrug", "data.action"),
    ("adapter.superseded", "data.dataset_hash", "NOT-A-HASH", "data.dataset_hash"),
    ("sampling.requested", "data.k", 0, "data.k"),
    ("attempts.sampled", "data.hashes.0", "not-a-sha256", "data.hashes.0"),
    ("attempts.sampled", "data.k", 65, "data.k"),
    ("sampling.completed", "data.pass_at_k", 1.5, "data.pass_at_k"),
]


def test_bad_value_table_covers_every_type() -> None:
    assert {row[0] for row in BAD_VALUES} == set(TYPES)


@pytest.mark.parametrize(("event_type", "path", "value", "names"), BAD_VALUES)
def test_bad_value_is_rejected_naming_the_field(event_type: str, path: str, value: Any, names: str) -> None:
    body = example(event_type)
    _set(body, path, value)
    reason = rejection(body)
    assert names in reason, reason
    if not (event_type == "event.rejected" and path == "data.reason"):  # a rule JSON Schema can't say
        assert not validator(event_type).is_valid(body)


# --------------------------------------------------------------------------- envelope errors


def test_unknown_type_lists_the_known_types() -> None:
    body = example("interaction.recorded")
    body["type"] = "interaction.deleted"
    reason = rejection(body)
    assert "interaction.deleted" in reason
    assert reason.startswith("type:")
    for known in TYPES:
        assert known in reason


def test_missing_type_is_rejected() -> None:
    body = example("feedback.given")
    del body["type"]
    assert rejection(body).startswith("type:")


@pytest.mark.parametrize("raw", [b"{not json", b"", "\x00", b'{"id": '])
def test_not_json_is_rejected(raw: bytes | str) -> None:
    assert "not JSON" in rejection(raw)


@pytest.mark.parametrize("raw", [b"[]", b"42", b'"interaction.recorded"', b"null"])
def test_json_that_is_not_an_object_is_rejected(raw: bytes) -> None:
    assert "JSON object" in rejection(raw)


@pytest.mark.parametrize("field", ["id", "schema_version", "time", "source", "data"])
def test_missing_envelope_field_is_named(field: str) -> None:
    body = example("outcome.observed")
    del body[field]
    reason = rejection(body)
    assert reason.startswith(f"{field}:")
    assert "required" in reason


def test_newer_schema_version_is_rejected_clearly() -> None:
    body = example("feedback.given")
    body["schema_version"] = CATALOGUE["feedback.given"].schema_version + 1
    reason = rejection(body)
    assert reason.startswith("schema_version:")
    assert "newer" in reason and "feedback.given" in reason


def test_schema_version_zero_is_rejected() -> None:
    body = example("feedback.given")
    body["schema_version"] = 0
    assert rejection(body).startswith("schema_version:")


def test_bad_time_is_rejected() -> None:
    body = example("outcome.observed")
    body["time"] = "yesterday"
    assert rejection(body).startswith("time:")


def test_empty_source_is_rejected() -> None:
    body = example("outcome.observed")
    body["source"] = ""
    assert rejection(body).startswith("source:")


def test_message_over_the_size_limit_is_rejected() -> None:
    body = example("interaction.recorded")
    body["data"]["input"] = "x" * MAX_EVENT_BYTES
    raw = json.dumps(body).encode()
    assert len(raw) > MAX_EVENT_BYTES
    reason = rejection(raw)
    assert str(MAX_EVENT_BYTES) in reason and "bytes" in reason


def test_size_limit_counts_bytes_not_characters() -> None:
    # 600k two-byte characters: under the limit in characters, over it in UTF-8 bytes
    text = json.dumps({"type": "interaction.recorded", "pad": "é" * 600_000}, ensure_ascii=False)
    assert len(text) < MAX_EVENT_BYTES < len(text.encode())
    assert "limit" in rejection(text)


def test_the_largest_valid_text_still_fits() -> None:
    body = example("interaction.recorded")
    body["data"]["input"] = "x" * 200_000
    assert parse_event(json.dumps(body).encode()).data.input == "x" * 200_000


# --------------------------------------------------------------------------- subjects, ids


@pytest.mark.parametrize("event_type", TYPES)
def test_subject_routes_intake_to_raw_and_the_rest_to_log(event_type: str) -> None:
    stream = "raw" if event_type in INTAKE else "log"
    assert subject_for(event_type) == f"fw.{stream}.{event_type}"
    assert parse_event((EXAMPLES_DIR / f"{event_type}.json").read_bytes()).subject == subject_for(event_type)


def _interaction() -> Any:
    return new_event(
        InteractionRecorded(
            session_id="s-1", role="coder", model_id="m", input="write add()", output="def add(): ..."
        ),
        source="sdk",
    )


def test_new_event_starts_its_own_correlation() -> None:
    cause = _interaction()
    assert cause.correlation_id == cause.id
    assert cause.causation_id is None


def test_derived_event_is_deterministic() -> None:
    cause = _interaction()
    feedback = FeedbackGiven(interaction_id=cause.id, rating=4)
    a = derived_event(feedback, cause=cause, source="anonymize")
    b = derived_event(feedback, cause=cause, source="anonymize")
    assert a.id == b.id
    assert derived_event(feedback, cause=cause, source="anonymize", index=0).id == a.id
    assert derived_event(feedback, cause=cause, source="assess").id != a.id
    assert derived_event(feedback, cause=cause, source="anonymize", index=1).id != a.id
    assert a.causation_id == cause.id and a.correlation_id == cause.correlation_id
    assert re.fullmatch(ID_PATTERN, a.id)
    assert id_time_ms(a.id) == id_time_ms(cause.id), "a derived id sorts next to its cause"


def test_derived_event_from_another_cause_gets_another_id() -> None:
    feedback = FeedbackGiven(interaction_id=new_id(), rating=4)
    one, two = _interaction(), _interaction()
    assert (
        derived_event(feedback, cause=one, source="x").id != derived_event(feedback, cause=two, source="x").id
    )


def test_derived_event_keeps_the_root_correlation_along_a_chain() -> None:
    root = _interaction()
    mid = derived_event(FeedbackGiven(interaction_id=root.id), cause=root, source="a")
    leaf = derived_event(FeedbackGiven(interaction_id=root.id), cause=mid, source="b")
    assert leaf.causation_id == mid.id
    assert leaf.correlation_id == root.id


def test_new_ids_sort_by_time() -> None:
    times = [1_700_000_000_000 + step for step in (0, 1, 2, 1000, 86_400_000, 10**9)]
    ids = [new_id(now_ms=ms) for ms in times]
    assert ids == sorted(ids)
    assert [id_time_ms(i) for i in ids] == times
    assert all(re.fullmatch(ID_PATTERN, i) for i in ids)


def test_new_ids_are_unique_within_one_millisecond() -> None:
    ids = {new_id(now_ms=1_700_000_000_000) for _ in range(1000)}
    assert len(ids) == 1000


def test_ids_are_encoded_as_the_reference_loop_encodes_them() -> None:
    """The unrolled encoders (two characters a lookup) write what one character at a time writes."""
    import random

    from flywheel_loop.schemas.ids import _encode, _encode50, _encode80

    rng = random.Random(7)
    values = [0, 1, 31, 32, 1023, 1024, (1 << 50) - 1, (1 << 80) - 1] + [rng.getrandbits(80) for _ in range(2000)]
    for v in values:
        assert _encode80(v) == _encode(v, 16)
        assert _encode50(v) == _encode(v, 10)


def test_new_id_without_a_clock_is_now() -> None:
    import time

    before = int(time.time() * 1000)
    eid = new_id()
    after = int(time.time() * 1000)
    assert before <= id_time_ms(eid) <= after


def test_parsed_event_is_immutable() -> None:
    event = parse_event((EXAMPLES_DIR / "feedback.given.json").read_bytes())
    with pytest.raises(ValidationError):
        event.data.rating = 5  # type: ignore[misc]
    with pytest.raises(ValidationError):
        event.id = new_id()  # type: ignore[misc]


def test_to_bytes_is_stable_under_deep_copy() -> None:
    event = parse_event((EXAMPLES_DIR / "interaction.anonymized.json").read_bytes())
    assert copy.deepcopy(event).to_bytes() == event.to_bytes()
