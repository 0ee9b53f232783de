"""Scoring through a real NATS: late and out-of-order evidence, replay, bad evidence, stats.

The tests publish ``*.anonymized`` events themselves (the anonymizer is not under test
here) and read what the engine's built-in plugins put on the log and in the projections.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from rich.console import Console

from flywheel_loop.engine.assessment import Assessor
from flywheel_loop.engine.bus import Bus
from flywheel_loop.engine.config import Settings
from flywheel_loop.engine.hookspecs import hookimpl
from flywheel_loop.engine.plugin_host import PluginHost
from flywheel_loop.engine.processor import ProcessContext, apply_step
from flywheel_loop.engine.replay import differences, rebuild
from flywheel_loop.engine.state import ProcessorState
from flywheel_loop.plugins.insight.scores import Scores
from flywheel_loop.plugins.insight.stats import Anonymization, stats_data, stats_tables
from flywheel_loop.plugins.scoring.scorer import processor as scoring_processor
from flywheel_loop.plugins.scoring.settings import AssessmentConfig
from flywheel_loop.schemas import (
    Event,
    FeedbackAnonymized,
    FeedbackGiven,
    Findings,
    GatewayCall,
    InteractionAnonymized,
    InteractionRecorded,
    OutcomeAnonymized,
    OutcomeObserved,
    new_event,
    new_id,
)
from tests.conftest import RunningEngine, read_log, read_log_at, wait_for

MAX_ATTEMPTS = 8  # the grace for evidence that arrives before its interaction: ~1.4 s here

ANSWER = '```python\ndef add(a: int, b: int) -> int:\n    """Sum."""\n    return a + b\n```'


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """A generous time budget: these tests pin the scores, not the machine's speed (the
    budget has its own tests, with a slow plugin here and a hand-driven clock in
    test_assessment.py)."""
    return settings.model_copy(
        update={
            "assessment": AssessmentConfig(budget_ms=2000.0),
            "worker": settings.worker.model_copy(update={"max_attempts": MAX_ATTEMPTS}),
        }
    )


def interaction(iid: str | None = None, variant: str = "v1", model: str = "m-small") -> Event[Any]:
    iid = iid or new_id()
    recorded = InteractionRecorded(
        session_id="anon-s1",
        role="coder",
        model_id=model,
        prompt_variant=variant,
        input="Write `add(a, b)` returning the sum.",
        output=ANSWER,
        duration_ms=1200.0,
        cost_usd=0.0004,
        complexity="simple",
        domain="math",
    )
    data = InteractionAnonymized(
        interaction_id=iid, interaction=recorded, findings=Findings(counts={"EMAIL": 2, "API_KEY": 1})
    )
    return new_event(data, source="anonymize", correlation_id=iid)


def feedback(iid: str, **fields: Any) -> Event[Any]:
    data = FeedbackAnonymized(feedback_id=new_id(), feedback=FeedbackGiven(interaction_id=iid, **fields))
    return new_event(data, source="anonymize", correlation_id=iid)


def outcome(iid: str, **fields: Any) -> Event[Any]:
    data = OutcomeAnonymized(
        outcome_id=new_id(),
        outcome=OutcomeObserved(interaction_id=iid, **fields),
        findings=Findings(counts={"PATH": 1}),
    )
    return new_event(data, source="anonymize", correlation_id=iid)


async def assessed(bus: Bus, iid: str) -> list[Any]:
    return [e for e in await read_log(bus, "log", "quality.assessed") if e.data.interaction_id == iid]


async def assessed_count(bus: Bus, iid: str, n: int) -> list[Any]:
    """Wait until ``iid`` has ``n`` quality.assessed events; return them."""
    await wait_for(lambda: _has(bus, iid, n))
    return await assessed(bus, iid)


async def _has(bus: Bus, iid: str, n: int) -> bool:
    return len(await assessed(bus, iid)) >= n


async def rejections(bus: Bus, processor: str = "scoring") -> list[Any]:
    return [e for e in await read_log(bus, "log", "event.rejected") if e.data.processor == processor]


# --------------------------------------------------------------------------- late evidence


async def test_late_evidence_rescores_with_rising_confidence(
    bus: Bus, engine_with: Callable[..., RunningEngine]
) -> None:
    iid = new_id()
    async with engine_with() as running:
        await bus.publish(interaction(iid))
        (first,) = await assessed_count(bus, iid, 1)
        await bus.publish(outcome(iid, compiles=True, tests_passed=3, tests_failed=1, lint_errors=0))
        second = (await assessed_count(bus, iid, 2))[1]
        await bus.publish(feedback(iid, rating=5, implicit="accepted", time_to_accept_s=10.0))
        third = (await assessed_count(bus, iid, 3))[2]

        # evidence that changes nothing (the same outcome observed twice) emits nothing new
        await bus.publish(outcome(iid, compiles=True, tests_passed=3, tests_failed=1, lint_errors=0))
        await wait_for(lambda: _position_covers_log(bus, running))
        scores = running.projection("scores")
        await scores.catch_up()
        row = scores.store.db.execute(
            "SELECT reward, confidence, assessments, event_id FROM scores WHERE interaction_id = ?", (iid,)
        ).fetchone()

    confidences = [e.data.confidence for e in (first, second, third)]
    assert confidences[0] < confidences[1] < confidences[2] == 1.0
    assert "outcome_reward.tests" not in first.data.scores
    assert second.data.scores["outcome_reward.tests"] == 0.75
    assert third.data.scores["outcome_reward.human"] == 1.0
    assert [len(e.data.evidence) for e in (first, second, third)] == [1, 2, 3]
    assert third.data.model_id == "m-small" and third.data.prompt_variant == "v1"
    assert third.data.cost_usd == 0.0004 and third.data.complexity == "simple"
    assert len(await assessed(bus, iid)) == 3  # old events are never rewritten, none was added
    assert row == (third.data.reward, 1.0, 3, third.id)  # the projection holds the latest


async def _position_covers_log(bus: Bus, running: RunningEngine) -> bool:
    """True once the scoring consumer has acknowledged everything on its subjects."""
    worker = next(w for w in running.engine.workers if w.processor.name == "scoring")
    info = await bus.js.consumer_info(worker.stream_name, "scoring")
    return int(info.num_pending) == 0 and int(info.num_ack_pending) == 0


async def test_evidence_before_its_interaction_is_held_and_order_does_not_change_the_score(
    bus: Bus, engine_with: Callable[..., RunningEngine]
) -> None:
    late, in_order = new_id(), new_id()
    evidence = {"fb": dict(thumbs="up", implicit="modified"), "oc": dict(compiles=True, tests_passed=2)}
    async with engine_with():
        # out of order: feedback and outcome first, the interaction last
        early_fb, early_oc = feedback(late, **evidence["fb"]), outcome(late, **evidence["oc"])
        await bus.publish(early_fb)
        await bus.publish(early_oc)
        await bus.publish(interaction(late))
        # the same evidence in order, for comparison
        await bus.publish(interaction(in_order))
        await bus.publish(outcome(in_order, **evidence["oc"]))
        await bus.publish(feedback(in_order, **evidence["fb"]))
        await wait_for(lambda: _all_evidence_used(bus, late))
        await wait_for(lambda: _all_evidence_used(bus, in_order))
    final_late = (await assessed(bus, late))[-1].data
    final_in_order = (await assessed(bus, in_order))[-1].data
    assert {early_fb.id, early_oc.id} <= set(final_late.evidence)
    assert final_late.scores == final_in_order.scores
    assert final_late.reward == final_in_order.reward
    assert await rejections(bus) == []  # held, not rejected: the interaction came within the grace


async def _all_evidence_used(bus: Bus, iid: str) -> bool:
    events = await assessed(bus, iid)
    return bool(events) and len(events[-1].data.evidence) == 3


# --------------------------------------------------------------------------- bad evidence


async def test_bad_evidence_gets_a_clear_rejection_and_harms_nothing(
    bus: Bus, engine_with: Callable[..., RunningEngine], settings: Settings
) -> None:
    iid = new_id()
    rating_9 = feedback(iid, rating=5).model_dump(mode="json")
    rating_9["data"]["feedback"]["rating"] = 9
    negative = outcome(iid, tests_passed=1).model_dump(mode="json")
    negative["data"]["outcome"]["tests_failed"] = -3
    stranger = new_id()  # an interaction that never arrives
    orphan = outcome(stranger, compiles=True)
    first = interaction(iid)
    good = feedback(iid, thumbs="up")
    async with engine_with() as running:
        await bus.publish(first)
        for body in (rating_9, negative):
            subject = f"fw.log.{body['type']}"
            await bus.publish_raw(subject, orjson.dumps(body), {"Nats-Msg-Id": body["id"]})
        await bus.publish(orphan)
        await wait_for(lambda: _count(rejections(bus), 3))
        # the engine goes on: good evidence after the bad is scored
        await bus.publish(good)
        await assessed_count(bus, iid, 2)
        log_index = running.projection("log_index")
        await log_index.catch_up()

    reasons = {e.data.original_id: e.data for e in await rejections(bus)}
    assert "data.feedback.rating" in reasons[rating_9["id"]].reason
    assert "less than or equal to 5" in reasons[rating_9["id"]].reason
    assert "data.outcome.tests_failed" in reasons[negative["id"]].reason
    assert "greater than or equal to 0" in reasons[negative["id"]].reason
    unknown = reasons[orphan.id]
    assert "UnknownInteraction" in unknown.reason and stranger in unknown.reason
    assert unknown.attempts == MAX_ATTEMPTS
    assert (await assessed(bus, iid))[-1].data.evidence == [first.id, good.id]  # the bad left no trace
    assert await assessed(bus, stranger) == []

    stats = stats_data(settings)
    by_processor = {r["processor"]: r for r in stats["rejected"]}
    assert by_processor["scoring"]["all"] == 3 and by_processor["scoring"]["window"] == 3


async def _count(events: Any, n: int) -> bool:
    return len(await events) >= n


# --------------------------------------------------------------------------- replay


async def test_replay_reproduces_the_scores_exactly(
    bus: Bus, engine_with: Callable[..., RunningEngine], settings: Settings, tmp_path: Path
) -> None:
    ids = [new_id() for _ in range(6)]
    async with engine_with() as running:
        for i, iid in enumerate(ids):
            await bus.publish(interaction(iid, variant=f"v{i % 2}"))
        for i, iid in enumerate(ids):
            await bus.publish(outcome(iid, compiles=i % 3 != 0, tests_passed=i, tests_failed=5 - i))
            if i % 2:
                await bus.publish(feedback(iid, rating=1 + i % 5))
        await wait_for(lambda: _count(read_log(bus, "log", "quality.assessed"), 6 + 6 + 3))
        await wait_for(lambda: _position_covers_log(bus, running))
        for name in ("scores", "anonymization"):
            await running.projection(name).catch_up()
        live = {name: running.projection(name).store.path for name in ("scores", "anonymization")}

        # 1. the projections rebuilt from the log equal the live ones, table for table
        for projection in (Scores(), Anonymization()):
            fresh = tmp_path / f"replayed-{projection.name}.sqlite"
            await rebuild(bus, projection, fresh)
            assert differences(live[projection.name], fresh) == []

    # 2. re-scoring the log's evidence from scratch (a fresh cache, folded from the log) gives the
    #    same scores, event for event
    log = await read_log_at(bus, "log")
    scoring = scoring_processor(settings)
    state = ProcessorState.open(scoring, tmp_path / "rescore" / "state.sqlite")
    state.fold(log)
    host = PluginHost(settings)
    rescored = []
    for seq, event in log:
        if event.type in scoring.consumes:
            ctx = ProcessContext(
                settings=settings, log=logging.getLogger("rescore"), plugins=host, sequence=seq, store=state
            )
            rescored += [p.model_dump() for p in await apply_step(scoring, event, ctx)]
    live_scores = [e.data.model_dump() for e in await read_log(bus, "log", "quality.assessed")]
    assert rescored == []  # every input is answered on the log: nothing is scored twice
    assert live_scores and all(s["reward"] is not None for s in live_scores)
    fresh = ProcessorState.open(scoring, tmp_path / "rescore2" / "state.sqlite")
    fresh.fold((seq, e) for seq, e in log if e.type != "quality.assessed")  # as if nothing was answered yet
    for seq, event in log:
        if event.type in scoring.consumes:
            ctx = ProcessContext(
                settings=settings, log=logging.getLogger("rescore"), plugins=host, sequence=seq, store=fresh
            )
            rescored += [p.model_dump() for p in await apply_step(scoring, event, ctx)]
    assert rescored == live_scores


# --------------------------------------------------------------------------- slow and optional assessors


def sluggish(evidence: Any) -> Any:
    import time

    time.sleep(0.03)
    return None


class Sluggish:
    """An assessor that always overruns a 5 ms budget."""

    @hookimpl
    def register_assessors(self, register: Callable[[Assessor], None], settings: Settings) -> None:
        register(Assessor("sluggish", sluggish))


async def test_slow_assessor_falls_back_and_ruff_runs_when_enabled(
    bus: Bus, engine_with: Callable[..., RunningEngine], settings: Settings
) -> None:
    bus.settings = settings.model_copy(
        update={
            "assessment": AssessmentConfig(budget_ms=2000.0, budgets_ms={"sluggish": 5.0}, disabled=[])
        }
    )
    iid = new_id()
    async with engine_with(Sluggish()):
        await bus.publish(interaction(iid))
        (event,) = await assessed_count(bus, iid, 1)
    assert event.data.fallbacks == ["sluggish"]
    assert event.data.scores["ruff_lint.lint"] == 1.0  # ruff finds nothing in the answer
    assert "ruff_lint" in event.data.assessors
    assert 0 < event.data.reward <= 1


# --------------------------------------------------------------------------- stats


async def test_stats_show_averages_per_model_variant_and_role(
    bus: Bus, engine_with: Callable[..., RunningEngine], settings: Settings
) -> None:
    ids = [new_id() for _ in range(4)]
    async with engine_with() as running:
        for i, iid in enumerate(ids):
            await bus.publish(
                interaction(iid, variant="v-a" if i < 3 else "v-b", model="m-big" if i else "m-small")
            )
        await wait_for(lambda: _count(read_log(bus, "log", "quality.assessed"), 4))
        for name in ("scores", "anonymization", "log_index", "bandit_state"):
            await running.projection(name).catch_up()

    data = stats_data(settings)
    assert data["missing"] == []
    assert data["overall"]["all"]["interactions"] == 4 == data["overall"]["window"]["interactions"]
    assert data["overall"]["all"]["cost_usd"] == pytest.approx(0.0004)
    variants = {row["key"]: row["all"]["interactions"] for row in data["by"]["prompt_variant"]}
    assert variants == {"v-a": 3, "v-b": 1}
    models = {row["key"]: row["all"]["interactions"] for row in data["by"]["model_id"]}
    assert models == {"m-big": 3, "m-small": 1}
    assert data["anonymized"]["interaction.anonymized"] == {"window": 4, "all": 4}
    assert data["scrubbed"]["EMAIL"] == {"window": 8, "all": 8}
    arms = {(a["decision"], a["arm"]): a["pulls"] for a in data["arms"]}
    assert arms[("prompt_variant", "v-a")] == 3 and arms[("model", "m-small")] == 1

    console = Console(record=True, width=80)  # a plain terminal: every table must stay readable in it
    for table in stats_tables(settings):
        console.print(table)
    text = console.export_text()
    for expected in ("Per model", "Per prompt variant", "Per role", "Anonymization", "scrubbed EMAIL", "v-a",
                     "avg reward", "avg cost $", "avg duration ms", "all time", "m-small"):
        assert expected in text  # headers and keys whole, not wrapped or cut
    assert max(len(line) for line in text.splitlines()) <= 80


async def test_stats_on_a_fresh_state_folder_say_what_is_missing(settings: Settings) -> None:
    data = stats_data(settings)
    assert sorted(data["missing"]) == ["anonymization", "bandit_state", "log_index", "scores"]
    assert stats_tables(settings)[-1].title == "Not built yet"


def gateway_interaction(iid: str, served: str, status: str) -> Event[Any]:
    base = interaction(iid, model="the-agent-says-this").data.interaction
    call = GatewayCall(served_version=served, requested="coder", upstream="http://127.0.0.1:1/v1",
                       api="openai.chat", status=status, http_status=200 if status == "ok" else 502)
    recorded = base.model_copy(update={"gateway": call})
    return new_event(InteractionAnonymized(interaction_id=iid, interaction=recorded), source="anonymize",
                     correlation_id=iid)


async def test_a_gateway_call_is_credited_to_the_version_that_served_it_and_a_failed_one_is_not_scored(
    bus: Bus, engine_with: Callable[..., RunningEngine]
) -> None:
    ok, failed = new_id(), new_id()
    async with engine_with() as running:
        await bus.publish(gateway_interaction(ok, "coder-v2", "ok"))
        await bus.publish(gateway_interaction(failed, "coder-v2", "failed"))
        (score,) = await assessed_count(bus, ok, 1)
        await bus.publish(outcome(failed, compiles=False))
        await wait_for(lambda: _position_covers_log(bus, running))
    assert score.data.model_id == "coder-v2"  # the gateway's word, not the agent's
    assert await assessed(bus, failed) == []
