"""The gateway with the official clients, against a real nats-server and real upstream servers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import anthropic
import openai
import pytest

from engine.bus import Bus
from engine.config import Settings
from tests.gateway_helpers import deploy, gateway_settings, recorded, running_gateway
from tests.gateway_upstream import StubUpstream


@pytest.fixture
async def stub() -> AsyncIterator[StubUpstream]:
    upstream = await StubUpstream("coder-v1").start()
    yield upstream
    await upstream.stop()


async def test_openai_client_whole_and_streamed_through_a_role(
    bus: Bus, settings_with: Callable[..., Settings], stub: StubUpstream
) -> None:
    settings = gateway_settings(settings_with)
    async with running_gateway(settings) as server:
        await deploy(bus, server, "coder", "coder-v1", stub.url)
        client = openai.AsyncOpenAI(base_url=server.url, api_key="unused")
        whole = await client.chat.completions.create(
            model="coder", messages=[{"role": "user", "content": "add two numbers"}],
            extra_headers={"x-flywheel-session": "s-1"})
        assert whole.choices[0].message.content == "answer: add two numbers"
        assert whole.model == "coder-v1" and whole.usage is not None and whole.usage.completion_tokens == 4
        stream = await client.chat.completions.create(
            model="coder", messages=[{"role": "user", "content": "sort a list"}], stream=True, user="s-2")
        pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        assert "".join(pieces) == "answer: sort a list"
        events = await recorded(bus, server, 2)
    first, second = (e.data for e in events)
    assert events[0].id == whole.id
    assert first.session_id == "s-1" and first.role == "coder" and first.model_id == "coder-v1"
    assert first.input == "add two numbers" and first.output == whole.choices[0].message.content
    assert first.gateway.served_version == "coder-v1" and first.gateway.requested == "coder"
    assert first.tokens.completion == 4 and first.gateway.status == "ok"
    assert second.session_id == "s-2" and second.output == "answer: sort a list" and second.gateway.stream
    assert second.gateway.ttft_ms is not None and second.tokens.completion == 4


async def test_anthropic_client_whole_and_streamed(
    bus: Bus, settings_with: Callable[..., Settings], stub: StubUpstream
) -> None:
    settings = gateway_settings(settings_with)
    async with running_gateway(settings) as server:
        await deploy(bus, server, "coder", "coder-v1", stub.url)
        client = anthropic.AsyncAnthropic(base_url=server.url.removesuffix("/v1"), api_key="unused")
        message = await client.messages.create(
            model="coder", max_tokens=32, system="be brief", metadata={"user_id": "dev-7"},
            messages=[{"role": "user", "content": "reverse a string"}])
        assert message.content[0].type == "text" and message.content[0].text == "answer: reverse a string"
        assert message.stop_reason == "end_turn" and message.usage.output_tokens == 4
        async with client.messages.stream(model="coder", max_tokens=32,
                                          messages=[{"role": "user", "content": "parse json"}]) as stream:
            text = "".join([t async for t in stream.text_stream])
            final = await stream.get_final_message()
        assert text == "answer: parse json" and final.usage.output_tokens == 3
        events = await recorded(bus, server, 2)
    assert [e.id for e in events] == [message.id, final.id]
    assert events[0].data.session_id == "dev-7" and events[0].data.output == "answer: reverse a string"
    assert events[1].data.output == text and events[1].data.gateway.api == "anthropic.messages"
