"""Built-in anonymizer: raw intake in, scrubbed events out; nothing raw goes further.

One processor, ``anonymizer``, consumes the three intake types on the raw stream and emits
their anonymized twins on the log:

- ``interaction.recorded`` -> ``interaction.anonymized``
- ``feedback.given``       -> ``feedback.anonymized``
- ``outcome.observed``     -> ``outcome.anonymized``

Every free-text field (input, output, context, tool arguments and outputs, comments,
corrections, final versions, error messages) goes through ``scrubber``: secrets and
personal data become typed placeholders such as ``[EMAIL]`` or ``[AWS_ACCESS_KEY]``. Session
and user ids become keyed hashes (HMAC-SHA256 with ``anonymizer.hash_key``), stable for one
key so a session's turns still group. The event's ``findings`` say which kinds were replaced
and how often, and which anonymizer versions did it; never a value.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections import Counter
from typing import Any

from pydantic import ValidationError

from flywheel_loop.engine.config import Settings
from flywheel_loop.engine.processor import ProcessContext, Processor
from flywheel_loop.plugins.privacy.scrubber import Scrubber, versions
from flywheel_loop.plugins.privacy.settings import AnonymizerConfig
from flywheel_loop.schemas import (
    Event,
    FeedbackAnonymized,
    FeedbackGiven,
    Findings,
    InteractionAnonymized,
    InteractionRecorded,
    OutcomeAnonymized,
    OutcomeObserved,
    Payload,
    describe_validation_error,
)

__all__ = ["ANONYMIZER_VERSION", "AnonymizationError", "Anonymizer", "keyed_hash"]

NAME = "anonymizer"
#: Bump when what is hashed or scrubbed changes (the scrubber has its own version too).
ANONYMIZER_VERSION = "1.0.0"

# The bounds of Text and ShortText in schemas/events.py: a placeholder can be longer than
# what it replaced (``a@b.io`` -> ``[EMAIL]``), so a field at its bound is cut back to it.
TEXT_MAX = 200_000
SHORT_MAX = 2_000

log = logging.getLogger(__name__)


class AnonymizationError(ValueError):
    """The scrubbed payload did not validate; the message names fields, never values."""


def keyed_hash(value: str, key: bytes, length: int = 16) -> str:
    """``anon-`` and the first ``length`` hex digits of HMAC-SHA256(key, value)."""
    return "anon-" + hmac.new(key, value.encode("utf-8"), hashlib.sha256).hexdigest()[:length]


class Anonymizer:
    """The pure step: one raw payload in, its anonymized payload out."""

    def __init__(self, config: AnonymizerConfig) -> None:
        self.scrubber = Scrubber(
            base64_limit=config.base64_entropy_limit,
            hex_limit=config.hex_entropy_limit,
            phone_regions=config.phone_regions,
        )
        self.key = config.hash_key.get_secret_value().encode("utf-8")
        self.hash_length = config.hash_length
        self.versions = {NAME: ANONYMIZER_VERSION, **versions()}

    # ------------------------------------------------------------------ processor

    def handle(self, event: Event[Any], ctx: ProcessContext) -> list[Payload]:
        """The processor's handler: the anonymized twin of one intake event."""
        data = event.data
        if isinstance(data, InteractionRecorded):
            return [self.interaction(event.id, data)]
        if isinstance(data, FeedbackGiven):
            return [self.feedback(event.id, data)]
        if isinstance(data, OutcomeObserved):
            return [self.outcome(event.id, data)]
        return []  # the consumer filters on the three types; anything else is not ours

    def interaction(self, event_id: str, rec: InteractionRecorded) -> InteractionAnonymized:
        counts: Counter[str] = Counter()
        d = rec.model_dump()
        d["session_id"] = self.hash_id(rec.session_id)
        counts["SESSION_ID"] += 1
        if rec.user_id is not None:
            d["user_id"] = self.hash_id(rec.user_id)
            counts["USER_ID"] += 1
        d["input"] = self.text(rec.input, counts)
        d["output"] = self.text(rec.output, counts)
        c = d["context"]
        for name in ("project", "language", "build"):
            c[name] = self.text(c[name], counts, SHORT_MAX)
        for name in ("tests", "extra"):
            c[name] = self.text(c[name], counts)
        c["files"] = [self.text(f, counts, SHORT_MAX) for f in c["files"]]
        if c["git"] is not None:
            for name in ("repo", "branch", "commit"):
                c["git"][name] = self.text(c["git"][name], counts, SHORT_MAX)
        for call in d["tool_calls"]:
            call["arguments"] = self.text(call["arguments"], counts)
            call["output"] = self.text(call["output"], counts)
        return InteractionAnonymized(
            interaction_id=event_id,
            interaction=_valid(InteractionRecorded, d),
            findings=self.findings(counts),
        )

    def feedback(self, event_id: str, fb: FeedbackGiven) -> FeedbackAnonymized:
        counts: Counter[str] = Counter()
        d = fb.model_dump()
        for name in ("comment", "correction", "final_version"):
            d[name] = self.text(d[name], counts)
        return FeedbackAnonymized(
            feedback_id=event_id, feedback=_valid(FeedbackGiven, d), findings=self.findings(counts)
        )

    def outcome(self, event_id: str, out: OutcomeObserved) -> OutcomeAnonymized:
        counts: Counter[str] = Counter()
        d = out.model_dump()
        d["errors"] = [self.text(e, counts) for e in out.errors]
        return OutcomeAnonymized(
            outcome_id=event_id, outcome=_valid(OutcomeObserved, d), findings=self.findings(counts)
        )

    # ------------------------------------------------------------------ parts

    def hash_id(self, value: str) -> str:
        return keyed_hash(value, self.key, self.hash_length)

    def text(self, value: str | None, counts: Counter[str], limit: int = TEXT_MAX) -> str | None:
        """``value`` scrubbed (its kinds added to ``counts``) and kept within ``limit``."""
        if not value:
            return value
        scrubbed, found = self.scrubber.scrub(value)
        counts.update(found)
        return scrubbed[:limit]

    def findings(self, counts: Counter[str]) -> Findings:
        return Findings(counts=dict(sorted(counts.items())), anonymizers=dict(self.versions))


def _valid(cls: type[Payload], data: dict[str, Any]) -> Any:
    """Validate a scrubbed payload; the error names fields only (a value could be raw text)."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise AnonymizationError(f"{cls.event_type}: {describe_validation_error(exc)}") from None


def warn_about_default_key(settings: Settings) -> None:
    """Warn (``flywheel up`` shows warnings) while the hash key is the published default."""
    if AnonymizerConfig.of(settings).uses_default_key:
        log.warning(
            "anonymizer.hash_key is the built-in default: anyone can link hashed session and user"
            " ids to guessed ones. Set FLYWHEEL_ANONYMIZER__HASH_KEY (or [anonymizer] hash_key)."
        )


def processor(settings: Settings) -> Processor:
    """The anonymizer processor, configured by ``settings``."""
    anonymizer = Anonymizer(AnonymizerConfig.of(settings))
    return Processor(
        name=NAME,
        consumes=("interaction.recorded", "feedback.given", "outcome.observed"),
        handle=anonymizer.handle,
        produces=("interaction.anonymized", "feedback.anonymized", "outcome.anonymized"),
        description="scrubs secrets and personal data from raw intake; ids become keyed hashes",
    )
