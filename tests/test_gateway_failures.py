"""The gateway when things go wrong: the bus stops mid-load, an upstream dies, requests and keys are bad."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import aiohttp
import anthropic
import openai
import pytest

from flywheel_loop.engine.bus import Bus
from flywheel_loop.engine.config import Settings
from flywheel_loop.engine.embedded import EmbeddedServer
from flywheel_loop.plugins.serving.gateway.access import hash_key
from tests.conftest import read_log, wait_for
from tests.gateway_helpers import deploy, gateway_settings, recorded, running_gateway
from tests.gateway_upstream import StubUpstream

ROOT = Path(__file__).resolve().parents[1]
ASK = [{"role": "user", "content": "write a test"}]


async def test_nats_stopped_mid_load_every_call_answered_and_recorded_once(
    bus: Bus, settings_with: Callable[..., Settings], nats_server: EmbeddedServer
) -> None:
    stub = await StubUpstream("coder-v1").start()
    settings = gateway_settings(settings_with)
    answered: list[str] = []
    try:
        async with running_gateway(settings) as server:
            await deploy(bus, server, "coder", "coder-v1", stub.url)
            await bus.close()  # the test's own connection would only get in the way of the restart
            calls = 400
            remaining = list(range(calls))
            async with aiohttp.ClientSession() as http:

                async def client() -> None:
                    while remaining:
                        i = remaining.pop()
                        body = {"model": "coder", "messages": [{"role": "user", "content": f"task {i}"}],
                                "stream": i % 2 == 0}
                        async with http.post(f"{server.url}/chat/completions", json=body,
                                             headers={"x-flywheel-session": f"s{i % 7}"}) as response:
                            assert response.status == 200
                            answered.append(response.headers["x-flywheel-interaction-id"])
                            await response.read()
                        await asyncio.sleep(0.005)

                load = asyncio.gather(*(client() for _ in range(4)))
                await wait_for(lambda: len(answered) >= 100)
                await asyncio.to_thread(nats_server.stop)  # the bus goes away mid-load
                await wait_for(lambda: len(answered) >= 250 and server.gateway.recorder.spilled > 0, 60)
                await asyncio.to_thread(nats_server.start)
                await load
            assert len(answered) == calls
            await server.gateway.recorder.flush(60)
            assert server.gateway.recorder.spill_files() == []
        fresh = await Bus.connect(settings, nats_server.url)
        try:
            stored = await read_log(fresh, "raw", "interaction.recorded")
        finally:
            await fresh.close()
    finally:
        await stub.stop()
    ids = [e.id for e in stored]
    assert len(ids) == len(set(ids)) == calls  # nothing doubled
    assert set(ids) == set(answered)  # nothing lost: each response id is one recorded interaction


def _start_stub_process(tmp_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    port_file = tmp_path / "stub.port"
    process = subprocess.Popen([sys.executable, "-m", "tests.gateway_upstream", "--port-file", str(port_file)],
                               cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    for _ in range(200):
        if port_file.exists():
            break
        import time

        time.sleep(0.05)
    return process, f"http://127.0.0.1:{port_file.read_text().strip()}/v1"


async def test_a_killed_upstream_gets_the_api_error_naming_it_and_is_recorded_as_failed(
    bus: Bus, settings_with: Callable[..., Settings], tmp_path: Path
) -> None:
    process, url = _start_stub_process(tmp_path)
    settings = gateway_settings(settings_with)
    try:
        async with running_gateway(settings) as server:
            await deploy(bus, server, "coder", "coder-v1", url)
            client = openai.AsyncOpenAI(base_url=server.url, api_key="unused", max_retries=0)
            ok = await client.chat.completions.create(model="coder", messages=ASK)
            assert ok.choices[0].message.content == "answer: write a test"
            os.kill(process.pid, signal.SIGKILL)
            process.wait(10)
            with pytest.raises(openai.APIStatusError) as whole:
                await client.chat.completions.create(model="coder", messages=ASK)
            with pytest.raises(openai.APIStatusError) as streamed:
                await client.chat.completions.create(model="coder", messages=ASK, stream=True)
            claude = anthropic.AsyncAnthropic(base_url=server.url.removesuffix("/v1"), api_key="x", max_retries=0)
            with pytest.raises(anthropic.APIStatusError) as messages:
                await claude.messages.create(model="coder", max_tokens=8, messages=ASK)
            events = await recorded(bus, server, 4)
    finally:
        if process.poll() is None:
            process.kill()
    for error in (whole.value, streamed.value):
        assert error.status_code == 502
        assert "coder-v1" in error.message and url in error.message and "unreachable" in error.message
    assert messages.value.status_code == 502 and messages.value.body["error"]["type"] == "api_error"
    assert "coder-v1" in messages.value.body["error"]["message"]
    assert events[0].data.gateway.status == "ok"
    for event in events[1:]:
        call = event.data.gateway
        assert call.status == "failed" and call.http_status == 502 and "unreachable" in call.error
        assert event.data.model_id == "coder-v1" and event.data.output == ""


async def test_bad_requests_are_refused_clearly_and_nothing_is_published(
    bus: Bus, settings_with: Callable[..., Settings]
) -> None:
    stub = await StubUpstream("coder-v1").start()
    settings = gateway_settings(settings_with, max_body_bytes=4096)
    try:
        async with running_gateway(settings) as server, aiohttp.ClientSession() as http:
            await deploy(bus, server, "coder", "coder-v1", stub.url)

            async def post(path: str, body: bytes) -> tuple[int, dict[str, object]]:
                async with http.post(server.url + path, data=body,
                                     headers={"Content-Type": "application/json"}) as response:
                    return response.status, await response.json()

            status, answer = await post("/chat/completions", b"{not json")
            assert status == 400 and "not valid JSON" in answer["error"]["message"]  # type: ignore[index]
            status, answer = await post("/chat/completions", b'{"model": "nobody", "messages": []}')
            assert status == 400 and answer["error"]["param"] == "messages"  # type: ignore[index]
            status, answer = await post("/chat/completions",
                                        b'{"model": "nobody", "messages": [{"role": "user", "content": "x"}]}')
            assert status == 404 and "'nobody' is not served here" in answer["error"]["message"]  # type: ignore
            status, answer = await post("/chat/completions", b'{"model": "coder", "messages": ["' + b"x" * 5000
                                        + b'"]}')
            assert status == 413 and "gateway.max_body_bytes" in answer["error"]["message"]  # type: ignore
            status, answer = await post("/messages", b'{"model": "coder", "messages": []}')
            assert status == 400 and answer["error"]["type"] == "invalid_request_error"  # type: ignore[index]
            status, answer = await post("/feedback", b'{"interaction_id": "01J0000000000000000000000A", "rating": 4}')
            assert status == 404 and answer["error"]["param"] == "interaction_id"  # type: ignore[index]
            status, answer = await post("/feedback", b'{"interaction_id": "01J0000000000000000000000A", "rating": 9}')
            assert status == 422 and answer["error"]["param"] == "rating"  # type: ignore[index]
            assert "less than or equal to 5" in answer["error"]["message"]  # type: ignore[index]
            status, answer = await post("/outcomes", b'{"interaction_id": "nope", "tests_passed": 1}')
            assert status == 422 and answer["error"]["param"] == "interaction_id"  # type: ignore[index]
            # an unknown path and a wrong method answer in the API's error shape, naming what is served
            status, answer = await post("/embeddings", b'{"model": "coder", "input": "x"}')
            assert status == 404 and "POST /v1/chat/completions" in answer["error"]["message"]  # type: ignore
            async with http.get(server.url + "/feedback") as response:
                status, answer = response.status, await response.json()
            assert status == 405 and answer["error"]["message"] == "GET is not allowed on /v1/feedback"  # type: ignore
            await server.gateway.recorder.flush(10)
            assert server.gateway.recorder.published == 0
    finally:
        await stub.stop()
    assert await read_log(bus, "raw") == []


async def test_keys_limit_roles_and_feedback_to_their_own_interactions(
    bus: Bus, settings_with: Callable[..., Settings]
) -> None:
    stub = await StubUpstream("coder-v1").start()
    keys = [{"name": "alice", "sha256": hash_key("key-a"), "roles": ["coder"], "sessions": ["alice-*"]},
            {"name": "bob", "sha256": hash_key("key-b"), "roles": ["fixer"]}]
    settings = gateway_settings(settings_with, keys=keys)
    try:
        async with running_gateway(settings) as server:
            await deploy(bus, server, "coder", "coder-v1", stub.url)
            alice = openai.AsyncOpenAI(base_url=server.url, api_key="key-a", max_retries=0)
            bob = openai.AsyncOpenAI(base_url=server.url, api_key="key-b", max_retries=0)
            stranger = openai.AsyncOpenAI(base_url=server.url, api_key="key-x", max_retries=0)
            mine = await alice.chat.completions.create(model="coder", messages=ASK, user="alice-1")
            other = await alice.chat.completions.create(model="coder", messages=ASK, user="shared-1")
            with pytest.raises(openai.AuthenticationError, match="unknown API key"):
                await stranger.chat.completions.create(model="coder", messages=ASK)
            with pytest.raises(openai.PermissionDeniedError, match="may not call role 'coder'"):
                await bob.chat.completions.create(model="coder", messages=ASK)
            async with aiohttp.ClientSession() as http:

                async def feedback(key: str, interaction_id: str) -> tuple[int, dict[str, object]]:
                    async with http.post(f"{server.url}/feedback", json={"interaction_id": interaction_id,
                                                                          "thumbs": "up"},
                                         headers={"Authorization": f"Bearer {key}"}) as response:
                        return response.status, await response.json()

                assert (await feedback("key-b", mine.id))[0] == 403  # another key's interaction
                assert (await feedback("key-a", other.id))[0] == 403  # a session alice is not given
                assert (await feedback("key-x", mine.id))[0] == 401
                status, answer = await feedback("key-a", mine.id)
                assert status == 202 and answer["interaction_id"] == mine.id
                async with http.post(f"{server.url}/outcomes", json={"interaction_id": mine.id, "compiles": True,
                                                                     "tests_passed": 3, "tests_failed": 1},
                                     headers={"x-api-key": "key-a"}) as response:
                    assert response.status == 202
            await recorded(bus, server, 2)
    finally:
        await stub.stop()
    raw = await read_log(bus, "raw")
    assert sorted(e.type for e in raw) == ["feedback.given", "interaction.recorded", "interaction.recorded",
                                           "outcome.observed"]
    evidence = [e for e in raw if e.type != "interaction.recorded"]
    assert all(e.data.interaction_id == mine.id and e.correlation_id == mine.id for e in evidence)
    assert {e.data.gateway.key for e in raw if e.type == "interaction.recorded"} == {"alice"}
