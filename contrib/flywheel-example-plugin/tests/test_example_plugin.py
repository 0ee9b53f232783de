"""The example plugin is found through its entry point and folds real events from NATS."""

from __future__ import annotations

from pathlib import Path

from engine.app import Engine
from engine.bus import Bus
from engine.config import load_settings
from engine.embedded import EmbeddedServer
from engine.plugin_host import PluginHost, installed_plugins
from schemas import InteractionAnonymized, InteractionRecorded, ToolCall, new_event


def test_entry_point_is_installed() -> None:
    assert installed_plugins()["tool_usage"].value == "flywheel_example"


async def test_counts_tool_calls_from_the_log(tmp_path: Path) -> None:
    with EmbeddedServer(tmp_path / "nats") as server:
        settings = load_settings(state_dir=tmp_path / "state", nats={"url": server.url},
                                 plugins={"enabled": ["tool_usage"]})
        bus = await Bus.connect(settings, server.url)
        await bus.ensure_streams()
        host = PluginHost(settings)
        assert host.names == ["tool_usage"]
        engine = Engine(bus, host)
        engine.prepare()
        for tools in (["pytest", "grep"], ["pytest"], []):
            raw = InteractionRecorded(
                session_id="s", role="tester", model_id="m", input="run tests", output="ok",
                tool_calls=[ToolCall(name=t) for t in tools],
            )
            cause = new_event(raw, source="agent")
            await bus.publish(new_event(InteractionAnonymized(interaction_id=cause.id, interaction=raw),
                                        source="test", cause=cause))
        runner = engine.runners[0]
        await runner.catch_up()
        rows = dict(((r, t), c) for r, t, c in runner.store.db.execute("SELECT * FROM tool_calls"))
        runner.close()
        await bus.close()
    assert rows == {("tester", "pytest"): 2, ("tester", "grep"): 1, ("tester", "(none)"): 1}
