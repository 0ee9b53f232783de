"""What the gateway records, and the feedback it accepts: capture rate, exclude patterns, restarts, binding."""

from __future__ import annotations

from collections.abc import Callable

import aiohttp
import openai

from flywheel_loop.engine.bus import Bus
from flywheel_loop.engine.config import Settings
from flywheel_loop.plugins.serving.gateway.access import bind_host
from flywheel_loop.plugins.serving.gateway.settings import GatewayConfig
from tests.conftest import read_log, wait_for
from tests.gateway_helpers import deploy, gateway_settings, recorded, running_gateway
from tests.gateway_upstream import StubUpstream


async def post(url: str, body: dict[str, object]) -> tuple[int, dict[str, object]]:
    async with aiohttp.ClientSession() as http, http.post(url, json=body) as response:
        return response.status, await response.json()


async def test_feedback_is_accepted_by_a_restarted_gateway(bus: Bus, settings_with: Callable[..., Settings]) -> None:
    stub = await StubUpstream("coder-v1").start()
    settings = gateway_settings(settings_with)
    try:
        async with running_gateway(settings) as first:
            await deploy(bus, first, "coder", "coder-v1", stub.url)
            answer = await openai.AsyncOpenAI(base_url=first.url, api_key="x").chat.completions.create(
                model="coder", messages=[{"role": "user", "content": "hi"}])
            await recorded(bus, first, 1)
        async with running_gateway(settings) as second:  # knows nothing but what the log tells it
            await wait_for(lambda: second.gateway.recording.owners.get(answer.id) is not None)
            status, body = await post(f"{second.url}/feedback", {"interaction_id": answer.id, "rating": 5})
            assert status == 202, body
            assert second.gateway.table.services["coder"].model_name == "coder-v1"  # and routes as before
            await second.gateway.recorder.flush(10)
    finally:
        await stub.stop()
    assert [e.data.interaction_id for e in await read_log(bus, "raw", "feedback.given")] == [answer.id]


async def test_capture_rate_and_exclude_patterns_decide_what_is_recorded(
    bus: Bus, settings_with: Callable[..., Settings]
) -> None:
    stub = await StubUpstream("coder-v1").start()
    settings = gateway_settings(settings_with, capture_rate=0.5, exclude_patterns=[r"(?i)password"])
    try:
        async with running_gateway(settings) as server:
            await deploy(bus, server, "coder", "coder-v1", stub.url)
            client = openai.AsyncOpenAI(base_url=server.url, api_key="x")
            answers = {}
            for i in range(40):
                answers[f"s{i}"] = await client.chat.completions.create(
                    model="coder", user=f"s{i}", messages=[{"role": "user", "content": f"task {i}"}])
            secret = await client.chat.completions.create(
                model="coder", user="s0", messages=[{"role": "user", "content": "my PASSWORD is hunter2"}])
            captured = server.gateway.recording.captured
            await server.gateway.recorder.flush(10)
            skipped = next(a for s, a in answers.items() if not server.gateway.recording.owners.get(a.id).recorded)
            status, body = await post(f"{server.url}/feedback", {"interaction_id": skipped.id, "rating": 5})
            assert status == 409 and "capture_rate" in str(body)
    finally:
        await stub.stop()
    stored = await read_log(bus, "raw", "interaction.recorded")
    assert len(stored) == captured and 10 <= captured <= 30  # about half the sessions, each whole
    assert secret.id not in {e.id for e in stored}
    sessions = {e.data.session_id for e in stored}
    assert all((answers[s].id in {e.id for e in stored}) == (s in sessions) for s in answers)


def test_without_keys_the_gateway_listens_on_loopback_only() -> None:
    warnings: list[str] = []
    assert bind_host(GatewayConfig(host="0.0.0.0"), warnings.append) == "127.0.0.1"
    assert "no gateway.keys" in warnings[0]
    keyed = GatewayConfig(host="0.0.0.0", keys=[{"name": "a", "sha256": "0" * 64}])
    assert bind_host(keyed, warnings.append) == "0.0.0.0" and len(warnings) == 1
