"""The gateway with the official clients, against a real nats-server and real upstream servers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import anthropic
import openai
import pytest

from flywheel_loop.engine.bus import Bus
from flywheel_loop.engine.config import Settings
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
            extra_headers={"x-flywheel-session": "s-1", "x-flywheel-language": "python",
                           "x-flywheel-domain": "math", "x-flywheel-complexity": "simple"})
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
    assert first.context.language == "python" and first.domain == "math" and first.complexity == "simple"
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


TOOLS = [{"type": "function", "function": {"name": "read_file", "description": "read a file",
                                           "parameters": {"type": "object",
                                                          "properties": {"path": {"type": "string"}}}}}]


async def test_tool_calls_and_results_pass_through_both_apis(
    bus: Bus, settings_with: Callable[..., Settings], stub: StubUpstream
) -> None:
    settings = gateway_settings(settings_with)
    async with running_gateway(settings) as server:
        await deploy(bus, server, "coder", "coder-v1", stub.url)
        gpt = openai.AsyncOpenAI(base_url=server.url, api_key="unused")
        ask: Any = [{"role": "user", "content": "what is in the readme?"}]
        whole = await gpt.chat.completions.create(model="coder", messages=ask, tools=TOOLS)
        call = whole.choices[0].message.tool_calls[0]  # type: ignore[index]
        assert call.function.name == "read_file" and call.function.arguments == '{"path": "README.md"}'
        assert whole.choices[0].finish_reason == "tool_calls"
        stream = await gpt.chat.completions.create(model="coder", messages=ask, tools=TOOLS, stream=True)
        arguments = "".join([c.choices[0].delta.tool_calls[0].function.arguments or ""  # type: ignore[index,union-attr]
                             async for c in stream if c.choices and c.choices[0].delta.tool_calls])
        assert arguments == '{"path": "README.md"}'
        claude = anthropic.AsyncAnthropic(base_url=server.url.removesuffix("/v1"), api_key="unused")
        tools: Any = [{"name": "read_file", "description": "read a file",
                       "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}}}]
        message = await claude.messages.create(model="coder", max_tokens=32, tools=tools, messages=ask)
        use = message.content[0]
        assert use.type == "tool_use" and use.name == "read_file" and use.input == {"path": "README.md"}
        assert message.stop_reason == "tool_use"
        async with claude.messages.stream(model="coder", max_tokens=32, tools=tools, messages=ask) as events:
            final = await events.get_final_message()
        assert final.content[0].type == "tool_use" and final.content[0].input == {"path": "README.md"}
        answered = await claude.messages.create(model="coder", max_tokens=32, tools=tools, messages=[
            *ask, {"role": "assistant", "content": [{"type": "tool_use", "id": use.id, "name": "read_file",
                                                     "input": {"path": "README.md"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "# Flywheel"}]}])
        forwarded = stub.requests[-1]["messages"]
        assert forwarded[-2]["tool_calls"][0]["function"]["name"] == "read_file"
        assert forwarded[-1] == {"role": "tool", "tool_call_id": use.id, "content": "# Flywheel"}
        events_ = await recorded(bus, server, 5)
    assert answered.id == events_[-1].id
    for event in events_[:4]:
        assert [(c.name, c.arguments) for c in event.data.tool_calls] == [("read_file", '{"path": "README.md"}')]


async def test_bandits_choose_the_prompt_variant_and_the_model_and_record_their_choice(
    bus: Bus, settings_with: Callable[..., Settings]
) -> None:
    small, big = await StubUpstream("small").start(), await StubUpstream("big").start()
    settings = settings_with(
        bandit={"seed": 3, "prompt_variants": {"coder": ["plain", "terse"], "fixer": ["plain", "terse"]},
                "models": [{"name": "small", "cost_per_token": 1e-7}, {"name": "big", "cost_per_token": 1e-6}]},
        gateway={"port": 0, "prompt_texts": {"terse": "Answer in one line."},
                 "upstreams": {"small": {"url": small.url}, "big": {"url": big.url}},
                 "roles": {"coder": {"route": "bandit"}}})
    try:
        async with running_gateway(settings) as server:
            gpt = openai.AsyncOpenAI(base_url=server.url, api_key="unused")
            answers = [await gpt.chat.completions.create(model="coder", user=f"s{i}",
                                                         messages=[{"role": "user", "content": "hi"}])
                       for i in range(12)]
            for refused in ({"model": "fixer", "messages": [{"role": "user", "content": "hi"}]},  # none serves it
                            {"model": "nobody", "messages": [{"role": "user", "content": "hi"}]},
                            {"model": "coder", "messages": "not a list"}):
                with pytest.raises(openai.APIStatusError):
                    await gpt.chat.completions.create(**refused)  # type: ignore[call-overload]
            events = await recorded(bus, server, 12)
            choices = await wait_for_choices(bus, 24)
            await server.gateway.recorder.flush(10)
            choices = await wait_for_choices(bus, 24)
    finally:
        await small.stop()
        await big.stop()
    assert len(choices) == 24  # two choices per answered call; none for the refused ones
    assert {a.model for a in answers} == {"small", "big"}  # the bandit explored both
    by_id = {e.id: e.data for e in events}
    for answer in answers:
        data = by_id[answer.id]
        assert data.role == "coder" and data.model_id == answer.model and data.prompt_variant in ("plain", "terse")
    terse = [r for r in small.requests + big.requests if r["messages"][0]["role"] == "system"]
    assert len(terse) == sum(d.prompt_variant == "terse" for d in by_id.values()) > 0
    assert all(r["messages"][0]["content"] == "Answer in one line." for r in terse)
    assert sorted({c.data.decision for c in choices}) == ["model", "prompt_variant"]
    assert all(c.source == "gateway" for c in choices)


async def wait_for_choices(bus: Bus, count: int) -> list[Any]:
    from tests.conftest import read_log, wait_for

    async def enough() -> list[Any] | None:
        events = await read_log(bus, "log", "arm.selected")
        return events if len(events) >= count else None

    result: list[Any] = await wait_for(enough, 30)
    return result
