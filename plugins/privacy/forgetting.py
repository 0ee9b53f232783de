"""Forgetting a data subject (a session or a user): ``flywheel forget --session ID | --user ID``.

The raw stream holds what agents published, with the plain session and user ids; the log holds
the anonymized twins, where those ids are the anonymizer's keyed hashes (``keyed_hash`` with
``anonymizer.hash_key``). The log is immutable (no delete, no purge), but the anonymized text on it
is sealed under one data key per interaction (``engine/sealing.py``), so forgetting is:

1. **Find** the subject's interactions: on the raw stream by the plain id, on the log by its
   keyed hash (so a subject whose raw intake has already expired is still found), and every
   feedback, outcome and score about those interactions.
2. **Erase** the subject's raw messages (interactions, and the feedback and outcomes about
   them) from the raw stream, one by one (JetStream overwrites a deleted message's bytes).
3. **Shred**: destroy the keys of those interactions in the key store (their bytes erased, a
   tombstone left so no key is made for them again). What the log, its replicas and any backup of
   the log hold of the subject can no longer be decrypted by anyone; the engine reads those events
   with their personal fields blank and ``forgotten`` set.
4. **Announce** it with ``data.forgotten`` on the log: the keyed hash (never the plain id), the
   interaction ids, the ids of the log events about them, counts, reason and requester. A
   subject with more ids than one event may list is announced in several parts.
5. Every consumer of anonymized data **honours** it (it is on the log, so a replay does too):
   ``scores`` deletes the rows, ``scoring`` deletes the evidence, ``embedder`` deletes the
   vectors, and ``dataset_builder`` rebuilds every dataset that held any of it, announces the
   replacement with ``dataset.superseded`` and deletes the old folder; builds and replays leave
   forgotten interactions out from then on.

Running ``forget`` again for the same subject is harmless: it erases what reached the raw
stream since (an agent still publishing for the session), destroys keys still alive, and announces
only when it found something; already-forgotten interactions with nothing new are reported as such.
Intake about a forgotten interaction that arrives later (feedback posted after the forget) is
dropped by the engine: its key cannot be made again.

A changed ``anonymizer.hash_key`` gives the subject a different keyed hash: log events hashed
with an old key are then found only through raw messages that still exist.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Literal

import nats.errors
import nats.js.errors
import orjson

from flywheel_loop.engine.bus import Bus
from flywheel_loop.engine.config import Settings
from flywheel_loop.plugins.privacy.anonymizer import keyed_hash
from flywheel_loop.plugins.privacy.settings import AnonymizerConfig
from flywheel_loop.schemas import (
    DataForgotten,
    DatasetBuilt,
    DatasetSuperseded,
    Event,
    FeedbackAnonymized,
    FeedbackGiven,
    InteractionAnonymized,
    InteractionRecorded,
    InvalidEvent,
    OutcomeAnonymized,
    OutcomeObserved,
    QualityAssessed,
    new_event,
    parse_event,
    subject_for,
)
from flywheel_loop.schemas.events import FORGOTTEN_IDS_MAX

__all__ = ["SOURCE", "ForgetError", "ForgetReport", "forget", "pseudonym"]

log = logging.getLogger(__name__)

SOURCE = "flywheel-forget"
Subject = Literal["session", "user"]

#: What the log scan reads: the anonymized events, scores, earlier forgetting, datasets.
LOG_TYPES = (
    "interaction.anonymized",
    "feedback.anonymized",
    "outcome.anonymized",
    "quality.assessed",
    "data.forgotten",
    "dataset.built",
    "dataset.superseded",
)


class ForgetError(RuntimeError):
    """Forgetting could not be done (the message says why and what to do)."""


@dataclass
class ForgetReport:
    """What ``forget`` found, erased and announced."""

    subject: Subject
    subject_hash: str
    raw_deleted: int = 0
    raw_already_gone: int = 0
    keys_destroyed: int = 0
    interaction_ids: list[str] = field(default_factory=list)
    event_ids: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    already_forgotten: int = 0  # interactions an earlier data.forgotten covered
    announced: list[str] = field(default_factory=list)  # ids of the data.forgotten events
    datasets: list[str] = field(default_factory=list)  # current datasets holding the subject's data
    dry_run: bool = False

    @property
    def found(self) -> bool:
        return bool(self.interaction_ids) or self.counts.get("raw_messages", 0) > 0

    @property
    def nothing_new(self) -> bool:
        """Every interaction found was forgotten before, no raw message and no key of them is left."""
        return (self.counts.get("raw_messages", 0) == 0 and self.counts.get("keys", 0) == 0
                and self.already_forgotten == len(self.interaction_ids))


def pseudonym(settings: Settings, value: str) -> str:
    """The anonymizer's keyed hash of a session or user id (what the log knows it by)."""
    cfg = AnonymizerConfig.of(settings)
    return keyed_hash(value, cfg.hash_key.get_secret_value().encode("utf-8"), cfg.hash_length)


def _loose_match(data: bytes, subject: Subject, value: str) -> bool:
    """Whether a raw message that does not validate still names the subject (it is erased too)."""
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    payload = body.get("data") if isinstance(body, dict) else None
    return isinstance(payload, dict) and payload.get(f"{subject}_id") == value


@dataclass
class _Found:
    raw_seqs: dict[int, str] = field(default_factory=dict)  # raw sequence -> event id ("" if invalid)
    interactions: set[str] = field(default_factory=set)
    raw_refs: list[tuple[int, str, str]] = field(default_factory=list)  # (seq, event id, interaction id)
    log_refs: list[tuple[str, str, str]] = field(default_factory=list)  # (event id, interaction id, kind)
    already: set[str] = field(default_factory=set)
    datasets: list[tuple[int, Event[Any]]] = field(default_factory=list)


async def _scan_raw(bus: Bus, subject: Subject, value: str, found: _Found) -> None:
    async for seq, data in bus.scan("raw", ["fw.raw.>"]):
        try:
            event = parse_event(data)
        except InvalidEvent:
            if _loose_match(data, subject, value):
                found.raw_seqs[seq] = ""
            continue
        d = event.data
        if isinstance(d, InteractionRecorded):
            if (d.session_id if subject == "session" else d.user_id) == value:
                found.raw_seqs[seq] = event.id
                found.interactions.add(event.id)
        elif isinstance(d, (FeedbackGiven, OutcomeObserved)):
            found.raw_refs.append((seq, event.id, d.interaction_id))


async def _scan_log(bus: Bus, subject: Subject, hashed: str, found: _Found) -> None:
    async for seq, data in bus.scan("log", [subject_for(t) for t in LOG_TYPES]):
        try:
            event = parse_event(data)
        except InvalidEvent:
            continue
        d = event.data
        if isinstance(d, InteractionAnonymized):
            rec = d.interaction
            if (rec.session_id if subject == "session" else rec.user_id) == hashed:
                found.interactions.add(d.interaction_id)
            found.log_refs.append((event.id, d.interaction_id, "interactions"))
        elif isinstance(d, FeedbackAnonymized):
            found.log_refs.append((event.id, d.feedback.interaction_id, "feedback"))
        elif isinstance(d, OutcomeAnonymized):
            found.log_refs.append((event.id, d.outcome.interaction_id, "outcomes"))
        elif isinstance(d, QualityAssessed):
            found.log_refs.append((event.id, d.interaction_id, "scores"))
        elif isinstance(d, DataForgotten):
            found.already.update(d.interaction_ids)
        elif isinstance(d, (DatasetBuilt, DatasetSuperseded)):
            found.datasets.append((seq, event))


async def _erase(bus: Bus, seqs: list[int]) -> tuple[int, int]:
    """Delete (and erase) raw messages by sequence; (deleted, already gone)."""
    name = bus.streams.raw
    deleted = gone = 0
    for seq in seqs:
        try:
            await bus.js.delete_msg(name, seq)
            deleted += 1
        except nats.js.errors.NotFoundError:
            gone += 1  # expired or deleted since the scan
        except nats.js.errors.APIError as exc:
            text = str(exc).lower()
            if "not found" in text or "no message" in text:
                gone += 1
                continue
            if "delete" in text and ("not permitted" in text or "deny" in text or "denied" in text):
                raise ForgetError(
                    f"stream {name} does not allow deleting messages (it was made by an older version);"
                    f" recreate it (export what you need, delete the stream, restart the engine), then run"
                    f" forget again: {exc}"
                ) from exc
            raise ForgetError(f"could not delete message {seq} from {name}: {exc}") from exc
    return deleted, gone


def _parts(interactions: list[str], events_of: dict[str, list[str]]) -> list[tuple[list[str], list[str]]]:
    """Interactions (each with its events) grouped so no list exceeds ``FORGOTTEN_IDS_MAX``."""
    parts: list[tuple[list[str], list[str]]] = []
    ids: list[str] = []
    events: list[str] = []
    for iid in interactions:
        mine = events_of.get(iid, [])
        if ids and (len(ids) + 1 > FORGOTTEN_IDS_MAX or len(events) + len(mine) > FORGOTTEN_IDS_MAX):
            parts.append((ids, events))
            ids, events = [], []
        ids.append(iid)
        events.extend(mine[:FORGOTTEN_IDS_MAX])
    if ids:
        parts.append((ids, events))
    return parts


async def forget(
    settings: Settings,
    bus: Bus,
    *,
    session: str | None = None,
    user: str | None = None,
    reason: str = "",
    requested_by: str | None = None,
    dry_run: bool = False,
) -> ForgetReport:
    """Forget one session or one user (see the module docstring); ``dry_run`` only reports."""
    if (session is None) == (user is None):
        raise ForgetError("name exactly one subject: a session id or a user id")
    subject: Subject = "session" if session is not None else "user"
    value = (session if session is not None else user) or ""
    if not value.strip():
        raise ForgetError(f"the {subject} id is empty")
    hashed = pseudonym(settings, value)
    report = ForgetReport(subject=subject, subject_hash=hashed, dry_run=dry_run)

    found = _Found()
    await _scan_raw(bus, subject, value, found)
    await _scan_log(bus, subject, hashed, found)
    for seq, event_id, iid in found.raw_refs:
        if iid in found.interactions:
            found.raw_seqs[seq] = event_id
    events_of: dict[str, list[str]] = defaultdict(list)
    counts = {"raw_messages": len(found.raw_seqs), "interactions": len(found.interactions),
              "feedback": 0, "outcomes": 0, "scores": 0}
    for event_id, iid, kind in found.log_refs:
        if iid in found.interactions:
            events_of[iid].append(event_id)
            if kind != "interactions":
                counts[kind] += 1
    interactions = sorted(found.interactions)
    report.interaction_ids = interactions
    report.event_ids = sorted(e for iid in interactions for e in events_of.get(iid, []))
    report.already_forgotten = len(found.interactions & found.already)
    report.datasets = _datasets_holding(found.datasets, set(report.event_ids))
    counts["keys"] = len(await bus.keys.live(interactions))  # data keys still alive: what shredding destroys
    report.counts = counts
    if dry_run or report.nothing_new:
        return report

    deleted, gone = await _erase(bus, sorted(found.raw_seqs))
    report.raw_deleted, report.raw_already_gone = deleted, gone
    counts["raw_deleted"] = deleted
    report.keys_destroyed = counts["keys_destroyed"] = await bus.keys.destroy(interactions)
    parts = _parts(interactions, events_of) or [([], [])]
    for n, (ids, events) in enumerate(parts, 1):
        payload = DataForgotten(
            subject=subject,
            subject_hash=hashed,
            interaction_ids=ids,
            event_ids=sorted(events),
            counts=dict(sorted(counts.items())),
            part=n,
            parts=len(parts),
            reason=reason[:2000],
            requested_by=requested_by,
        )
        event = new_event(payload, source=SOURCE)
        await bus.publish(event)
        report.announced.append(event.id)
    log.info("forgot %s %s: %d raw messages erased, %d keys destroyed, %d interactions announced in %s",
             subject, hashed, deleted, report.keys_destroyed, len(interactions), ", ".join(report.announced))
    return report


def _datasets_holding(history: list[tuple[int, Event[Any]]], event_ids: set[str]) -> list[str]:
    """Hashes of current datasets whose lineage (as the log lists it) holds any of ``event_ids``."""
    from flywheel_loop.plugins.shared.datasets import current_datasets

    return sorted(d.digest for d in current_datasets(history).values() if not event_ids.isdisjoint(d.lineage))
