"""The example plugin is found through its entry point and, through the public plugin API alone,
brings a settings section, a projection folding real events from NATS, an assessor whose score
reaches quality.assessed, and a command."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest
from typer.testing import CliRunner

from flywheel_loop.engine.app import Engine
from flywheel_loop.engine.bus import Bus
from flywheel_loop.engine.config import ConfigError, load_settings
from flywheel_loop.engine.embedded import EmbeddedServer
from flywheel_loop.engine.plugin_host import PluginHost, installed_plugins
from flywheel_loop.schemas import InteractionAnonymized, InteractionRecorded, ToolCall, new_event


def test_entry_point_is_installed() -> None:
    assert installed_plugins()["tool_usage"].value == "flywheel_example"


def test_its_settings_section_is_validated_like_a_built_in_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    from flywheel_example import ToolUsageConfig

    host = PluginHost(load_settings(tool_usage={"test_tools": ["nox"]}))
    assert ToolUsageConfig.of(host.settings).test_tools == ["nox"]
    with pytest.raises(ConfigError, match=r"tool_usage\.test_tools = \[\]: .*at least 1 item.*\(plugin tool_usage\)"):
        PluginHost(load_settings(tool_usage={"test_tools": []}))


async def _run(settings: Any, server_url: str, tools_per_turn: list[list[str]]) -> tuple[Engine, Bus]:
    bus = await Bus.connect(settings, server_url)
    await bus.ensure_streams()
    engine = Engine(bus, PluginHost(settings), only={"tool_usage", "anonymizer", "scoring"})
    engine.prepare()
    for tools in tools_per_turn:
        raw = InteractionRecorded(
            session_id="s", role="tester", model_id="m", input="run tests", output="ok",
            tool_calls=[ToolCall(name=t) for t in tools],
        )
        await bus.publish(new_event(raw, source="agent"))
    return engine, bus


async def test_counts_tool_calls_and_scores_test_runs(tmp_path: Path) -> None:
    with EmbeddedServer(tmp_path / "nats") as server:
        settings = load_settings(state_dir=tmp_path / "state", nats={"url": server.url},
                                 plugins={"enabled": ["tool_usage", "privacy", "scoring"]})
        engine, bus = await _run(settings, server.url, [["pytest", "grep"], ["grep"], []])
        stop = asyncio.Event()
        running = asyncio.create_task(engine.run(stop))
        scores: dict[str, Any] = {}
        deadline = asyncio.get_running_loop().time() + 30
        while len(scores) < 3 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.2)
            async for _, data in bus.scan("log", ["fw.log.quality.assessed"]):
                event = orjson.loads(data)
                scores[event["data"]["interaction_id"]] = event["data"]["scores"]
        runner = next(r for r in engine.runners if r.projection.name == "tool_usage")
        await runner.catch_up()
        rows = dict(((r, t), c) for r, t, c in runner.store.db.execute("SELECT * FROM tool_calls"))
        stop.set()
        await running
        await bus.close()
    assert rows == {("tester", "pytest"): 1, ("tester", "grep"): 2, ("tester", "(none)"): 1}
    ran = sorted(str(s.get("tool_usage.ran_tests")) for s in scores.values())
    assert ran == ["0.0", "1.0", "None"]  # pytest ran; tools but no test; no tool at all (not its business)


def test_its_command_lists_the_calls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flywheel_loop.engine.cli import build_app

    with EmbeddedServer(tmp_path / "nats") as server:
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("FLYWHEEL_NATS__URL", server.url)
        monkeypatch.setenv("FLYWHEEL_STATE_DIR", str(tmp_path / "state"))
        settings = load_settings()

        async def record() -> None:
            cause = new_event(InteractionRecorded(session_id="s", role="coder", model_id="m", input="x", output="y",
                                                  tool_calls=[ToolCall(name="pytest")]), source="agent")
            bus = await Bus.connect(settings, server.url)
            await bus.ensure_streams()
            await bus.publish(new_event(InteractionAnonymized(interaction_id=cause.id, interaction=cause.data),
                                        source="test", cause=cause))
            await bus.close()

        asyncio.run(record())
        result = CliRunner().invoke(build_app(), ["tools"])
    assert result.exit_code == 0, result.output
    assert result.output.split() == ["coder", "pytest", "1"]
