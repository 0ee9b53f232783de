"""Routing through the gateway: sticky canary split, rollback during a stream, pinning, base upstreams."""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from collections.abc import Callable

import aiohttp
import openai

from flywheel_loop.engine.bus import Bus
from flywheel_loop.engine.config import Settings
from tests.gateway_helpers import deploy, gateway_settings, recorded, roll_back, running_gateway
from tests.gateway_upstream import StubUpstream


async def test_canary_share_is_enforced_per_session_and_sticky(
    bus: Bus, settings_with: Callable[..., Settings]
) -> None:
    old, canary = await StubUpstream("coder-old").start(), await StubUpstream("coder-new").start()
    settings = gateway_settings(settings_with)
    try:
        async with running_gateway(settings) as server:
            await deploy(bus, server, "coder", "coder-old", old.url)
            await deploy(bus, server, "coder", "coder-new", canary.url, share=0.3, previous="coder-old")
            served: dict[str, list[str]] = defaultdict(list)
            sessions = [f"session-{i}" for i in range(2000)]
            queue = [s for s in sessions for _ in range(2)]
            async with aiohttp.ClientSession() as http:

                async def client() -> None:
                    while queue:
                        session = queue.pop()
                        body = {"model": "coder", "messages": [{"role": "user", "content": "hi"}]}
                        async with http.post(f"{server.url}/chat/completions", json=body,
                                             headers={"x-flywheel-session": session}) as response:
                            assert response.status == 200
                            served[session].append((await response.json())["model"])

                await asyncio.gather(*(client() for _ in range(16)))
            events = await recorded(bus, server, 4000, timeout=60)
    finally:
        await old.stop()
        await canary.stop()
    assert all(len(set(versions)) == 1 for versions in served.values())  # a session never changes side
    share = sum(versions[0] == "coder-new" for versions in served.values()) / len(sessions)
    assert 0.27 <= share <= 0.33, share
    by_version = Counter(e.data.model_id for e in events)
    assert by_version["coder-new"] == 2 * round(share * 2000) and sum(by_version.values()) == 4000
    assert all(e.data.gateway.canary == (e.data.model_id == "coder-new") for e in events)
    assert len(old.requests) + len(canary.requests) == 4000


async def test_a_rollback_during_a_stream_lets_it_finish_and_moves_the_next_request(
    bus: Bus, settings_with: Callable[..., Settings]
) -> None:
    previous = await StubUpstream("coder-v1").start()
    slow = await StubUpstream("coder-v2", chunk_delay=0.1).start()
    settings = gateway_settings(settings_with)
    try:
        async with running_gateway(settings) as server:
            await deploy(bus, server, "coder", "coder-v1", previous.url)
            await deploy(bus, server, "coder", "coder-v2", slow.url, previous="coder-v1")
            client = openai.AsyncOpenAI(base_url=server.url, api_key="unused")
            stream = await client.chat.completions.create(
                model="coder", messages=[{"role": "user", "content": "one two three four five"}], stream=True)
            pieces, rolled = [], False
            async for chunk in stream:
                assert chunk.model == "coder-v2"
                if chunk.choices and chunk.choices[0].delta.content:
                    pieces.append(chunk.choices[0].delta.content)
                if not rolled:  # the first chunk is here: the version serving it is rolled back
                    await roll_back(bus, server, "coder", "coder-v2", "coder-v1", previous.url)
                    rolled = True
            assert "".join(pieces) == "answer: one two three four five"
            after = await client.chat.completions.create(model="coder", messages=[{"role": "user", "content": "x"}])
            assert after.model == "coder-v1"
            events = await recorded(bus, server, 2)
    finally:
        await previous.stop()
        await slow.stop()
    assert [e.data.model_id for e in events] == ["coder-v2", "coder-v1"]
    assert events[0].data.output == "answer: one two three four five" and events[0].data.gateway.status == "ok"


async def test_pinned_version_base_upstream_and_models_list(bus: Bus, settings_with: Callable[..., Settings]) -> None:
    base, v1, v2 = [await StubUpstream(n).start() for n in ("qwen", "coder-v1", "coder-v2")]
    settings = gateway_settings(settings_with, upstreams={"qwen": {"url": base.url, "role": "fixer"}},
                                roles={"coder": {"base": "qwen"}})
    try:
        async with running_gateway(settings) as server:
            client = openai.AsyncOpenAI(base_url=server.url, api_key="unused")
            before = await client.chat.completions.create(model="coder", messages=[{"role": "user", "content": "a"}])
            assert before.model == "coder-base" and base.requests[-1]["model"] == "qwen"
            await deploy(bus, server, "coder", "coder-v1", v1.url)
            await deploy(bus, server, "coder", "coder-v2", v2.url, share=0.5, previous="coder-v1")
            pinned = [await client.chat.completions.create(model="coder-v1", user=f"s{i}",
                                                           messages=[{"role": "user", "content": "b"}])
                      for i in range(6)]
            assert {p.model for p in pinned} == {"coder-v1"}
            direct = await client.completions.create(model="qwen", prompt="hello there")
            assert direct.choices[0].text == "completion: hello there" and direct.model == "qwen"
            names = {m.id async for m in client.models.list()}
            assert names == {"coder", "coder-v1", "coder-v2", "qwen"}
            events = await recorded(bus, server, 8)
    finally:
        for stub in (base, v1, v2):
            await stub.stop()
    assert events[0].data.model_id == "coder-base" and events[0].data.role == "coder"
    assert events[-1].data.role == "fixer" and events[-1].data.gateway.api == "openai.completions"
