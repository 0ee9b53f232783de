"""One test per hook: a throwaway plugin implements it, and the engine does what the hook promises.

tests/test_hookspecs.py checks that every hook has such a test (after datasette's habit).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest
import typer
from pydantic import Field
from typer.testing import CliRunner

from flywheel_loop.engine.app import Engine
from flywheel_loop.engine.assessment import Assessment, Assessor, Evidence
from flywheel_loop.engine.bus import Bus
from flywheel_loop.engine.config import ConfigError, PluginSection, Settings, load_settings
from flywheel_loop.engine.extensions import DashboardPage, Rebuilder, RuntimeFactory, RuntimeUnavailable, ServedModel
from flywheel_loop.engine.hookspecs import hookimpl
from flywheel_loop.engine.plugin_host import PluginError, PluginHost
from flywheel_loop.engine.processor import ProcessContext, Processor
from flywheel_loop.engine.projection import Projection
from flywheel_loop.engine.services import Service, ServiceContext
from flywheel_loop.schemas import Event, InteractionAnonymized, InteractionRecorded, QualityAssessed, new_event
from tests.conftest import RunningEngine, read_log, wait_for


class WidgetConfig(PluginSection):
    section_name: ClassVar[str] = "widget"

    size: int = Field(default=3, ge=1, le=10)
    label: str = "w"


class WidgetPlugin:
    @hookimpl
    def register_settings(self, register: Callable[[type[PluginSection]], None]) -> None:
        register(WidgetConfig)


def recorded(text: str = "write a function") -> InteractionRecorded:
    return InteractionRecorded(session_id="s", role="coder", model_id="m", input=text, output="def f(): pass")


# --------------------------------------------------------------------------- settings


def test_hook_register_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    host = PluginHost(load_settings(widget={"size": 7}), load_entry_points=False)
    host.register(WidgetPlugin(), name="widgets")
    assert WidgetConfig.of(host.settings).size == 7
    assert host.sections()["widget"] == ("widgets", WidgetConfig)

    # a bad value names the key, the value, the rule and the plugin
    host = PluginHost(load_settings(widget={"size": 99}), load_entry_points=False)
    with pytest.raises(ConfigError, match=r"widget\.size = 99: .*less than or equal to 10"):
        host.register(WidgetPlugin(), name="widgets")

    # the environment reaches a plugin's section too
    monkeypatch.setenv("FLYWHEEL_WIDGET__LABEL", "from-env")
    assert WidgetConfig.of(load_settings()).label == "from-env"


def test_an_unknown_section_names_the_installed_plugins_and_their_sections(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "flywheel.toml").write_text("[trainr]\nepochs = 2\n")
    with pytest.raises(ConfigError) as info:
        PluginHost(load_settings())
    message = str(info.value)
    assert "trainr" in message and "no such setting" in message
    assert "[trainer] (training)" in message and "[anonymizer] (privacy)" in message


def test_a_bad_value_in_a_built_in_section_names_its_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"trainer\.lr = -1\.0: Input should be greater than 0 \(plugin training\)"):
        PluginHost(load_settings(trainer={"lr": -1.0}))


def test_two_plugins_cannot_register_one_section(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)

    class Other(PluginSection):
        section_name: ClassVar[str] = "widget"

    class OtherPlugin:
        @hookimpl
        def register_settings(self, register: Callable[[type[PluginSection]], None]) -> None:
            register(Other)

    host = PluginHost(load_settings(), load_entry_points=False)
    host.register(WidgetPlugin(), name="widgets")
    with pytest.raises(PluginError, match=r"'others' and 'widgets' both register the section \[widget\]"):
        host.register(OtherPlugin(), name="others")


def test_a_misspelt_hook_is_an_error_not_silence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)

    class Misspelt:
        @hookimpl
        def register_processor(self, register: Callable[[Processor], None], settings: Settings) -> None:
            raise AssertionError("never called")

    host = PluginHost(load_settings(), load_entry_points=False)
    with pytest.raises(PluginError, match="implements a hook that does not exist"):
        host.register(Misspelt(), name="misspelt")


def test_hook_configure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    seen: list[Settings] = []

    class Configured:
        @hookimpl
        def configure(self, settings: Settings) -> None:
            seen.append(settings)

    host = PluginHost(load_settings(), load_entry_points=False)
    host.register(Configured())
    host.configure()
    assert seen == [host.settings]


# --------------------------------------------------------------------------- the engine's loops


def shout(event: Event[Any], ctx: ProcessContext) -> list[InteractionAnonymized]:
    data = event.data.model_copy(update={"input": event.data.input.upper()})
    return [InteractionAnonymized(interaction_id=event.id, interaction=data)]


class Shouting:
    @hookimpl
    def register_processors(self, register: Callable[[Processor], None], settings: Settings) -> None:
        register(Processor("shout", ("interaction.recorded",), shout))


async def test_hook_register_processors(bus: Bus, engine_with: Callable[..., RunningEngine]) -> None:
    cause = new_event(recorded("hello"), source="agent")
    await bus.publish(cause)
    async with engine_with(Shouting(), builtins=False):
        out = await wait_for(lambda: read_log(bus, event_type="interaction.anonymized"))
    assert [e.data.interaction.input for e in out] == ["HELLO"]
    assert out[0].causation_id == cause.id and out[0].source == "shout"


class Inputs(Projection):
    name = "inputs"
    consumes = ("interaction.anonymized",)
    tables = "CREATE TABLE IF NOT EXISTS inputs (text TEXT NOT NULL, seq INTEGER NOT NULL);"

    def apply(self, db: Any, event: Event[Any], seq: int) -> None:
        db.execute("INSERT INTO inputs VALUES (?, ?)", (event.data.interaction.input, seq))


class Folding:
    @hookimpl
    def register_projections(self, register: Callable[[Projection], None], settings: Settings) -> None:
        register(Inputs())


async def test_hook_register_projections(bus: Bus, engine_with: Callable[..., RunningEngine]) -> None:
    for text in ("a", "b"):
        cause = new_event(recorded(text), source="agent")
        await bus.publish(new_event(InteractionAnonymized(interaction_id=cause.id, interaction=recorded(text)),
                                    source="test", cause=cause))
    async with engine_with(Folding(), builtins=False) as running:
        runner = running.projection("inputs")
        await runner.catch_up()
        rows = runner.store.db.execute("SELECT text FROM inputs ORDER BY seq").fetchall()
    assert rows == [("a",), ("b",)]


class Ticker:
    """A running service: it counts the events its context's bus sees while it runs."""

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.stopped = False

    @property
    def url(self) -> str | None:
        return "ticker://here"

    async def stop(self) -> None:
        self.stopped = True


async def test_hook_register_services(bus: Bus, settings: Settings) -> None:
    started: list[Ticker] = []

    async def start(ctx: ServiceContext) -> Ticker:
        started.append(Ticker(ctx))
        return started[-1]

    async def refuse(ctx: ServiceContext) -> None:
        raise RuntimeError("port 1 is taken")

    class Serving:
        @hookimpl
        def register_services(self, register: Callable[[Service], None], settings: Settings) -> None:
            register(Service("ticker", start))
            register(Service("broken", refuse))

    host = PluginHost(settings, load_entry_points=False)
    host.register(Serving())
    engine = Engine(bus, host)
    engine.prepare()
    warnings: list[str] = []
    running = await engine.start_services(warn=warnings.append)
    assert [(name, s.url) for name, s in running] == [("ticker", "ticker://here")]
    assert started[0].ctx.bus is bus and started[0].ctx.plugins is host
    assert warnings == ["service broken did not start: port 1 is taken"]  # the engine runs on without it
    await engine.stop_services()
    assert started[0].stopped


def test_hook_register_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)

    class Greeting:
        @hookimpl
        def register_commands(self, cli: typer.Typer) -> None:
            @cli.command()
            def greet(name: str) -> None:
                """Say hello."""
                typer.echo(f"hello {name} [with brackets]")

    app = typer.Typer()
    host = PluginHost(load_settings(), load_entry_points=False)
    host.register(Greeting())
    host.add_commands(app)

    @app.callback()
    def root() -> None:
        """A root, so greet is a subcommand."""

    result = CliRunner().invoke(app, ["greet", "ada"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "hello ada [with brackets]"


# --------------------------------------------------------------------------- looked up by other features


def long_prompts(evidence: Evidence) -> Assessment | None:
    return Assessment(scores={"long": 1.0 if len(evidence.interaction.interaction.input) > 10 else 0.0}, version="1")


class Judging:
    @hookimpl
    def register_assessors(self, register: Callable[[Assessor], None], settings: Settings) -> None:
        register(Assessor("prompt_length", long_prompts, "1"))


async def test_hook_register_assessors(
    bus: Bus, settings_with: Callable[..., Settings], engine_with: Callable[..., RunningEngine]
) -> None:
    cause = new_event(recorded("a prompt that is long enough"), source="agent")
    await bus.publish(cause)
    async with engine_with(Judging(), only={"anonymizer", "scoring"}):
        scored = await wait_for(lambda: read_log(bus, event_type="quality.assessed"))
    data: QualityAssessed = scored[0].data
    assert data.scores["prompt_length.long"] == 1.0
    assert data.assessors["prompt_length"] == "1"


def test_hook_register_runtimes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    from flywheel_loop.plugins.serving.deployer import runtimes_of

    class EchoRuntime:
        name = "echo"

        def __init__(self, settings: Settings) -> None:
            self.settings = settings

        def prepare(self, model: ServedModel) -> None: ...

        def serve(self, model: ServedModel, port: int = 0) -> str:
            return "http://127.0.0.1:1/v1"

        def generate(self, model: ServedModel, prompt: str, max_tokens: int = 64, temperature: float = 0.0) -> str:
            return prompt

        def stop(self, model: ServedModel) -> None: ...

    class Echoing:
        @hookimpl
        def register_runtimes(self, register: Callable[[RuntimeFactory], None], settings: Settings) -> None:
            register(RuntimeFactory("echo", EchoRuntime))

    host = PluginHost(load_settings(), load_entry_points=False)
    host.register(Echoing())
    make = runtimes_of(host)
    runtime = make("echo", host.settings)
    assert isinstance(runtime, EchoRuntime) and runtime.settings is host.settings
    with pytest.raises(RuntimeUnavailable, match="unknown runtime 'llama': deployer.runtime is one of echo"):
        make("llama", host.settings)


def test_hook_register_rebuilders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)

    async def rebuild(settings: Settings, bus: Bus, key: str, until: int) -> tuple[str, Path]:
        return f"{key}-{until}", tmp_path

    class Rebuilding:
        @hookimpl
        def register_rebuilders(self, register: Callable[[Rebuilder], None]) -> None:
            register(Rebuilder("index", rebuild))

    host = PluginHost(load_settings(), load_entry_points=False)
    host.register(Rebuilding())
    found = host.rebuilders()
    assert list(found) == ["index"]
    assert asyncio.run(found["index"].rebuild(host.settings, None, "coder", 12)) == ("coder-12", tmp_path)  # type: ignore[arg-type]
    # the built-in curation feature registers the dataset rebuilder `flywheel replay --dataset` uses
    assert "dataset" in PluginHost(load_settings()).rebuilders()


def test_hook_register_dashboard_pages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    from fastapi.testclient import TestClient

    from flywheel_loop.plugins.insight.dashboard.app import create_app
    from flywheel_loop.plugins.insight.dashboard.queries import DashboardData

    def rows(settings: Settings) -> tuple[list[str], list[list[Any]]]:
        return ["tool", "calls"], [["pytest", 3], ["<script>alert(1)</script>", 1]]

    class Paging:
        @hookimpl
        def register_dashboard_pages(self, register: Callable[[DashboardPage], None]) -> None:
            register(DashboardPage("tools", "Tools", rows, "calls per tool"))

    host = PluginHost(load_settings(), load_entry_points=False)
    host.register(Paging())
    app = create_app(DashboardData(tmp_path / "none.sqlite"), plugin_pages=host.dashboard_pages(),
                     settings=host.settings)
    client = TestClient(app)
    page = client.get("/pages/tools")
    assert page.status_code == 200
    assert "<td>pytest</td><td>3</td>" in page.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text and "<script>alert(1)" not in page.text
    assert 'href="/pages/tools"' in client.get("/datasets").text  # in every page's navigation
    assert client.get("/pages/nope").status_code == 404


def test_hook_synthesize_rehearsal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)

    class Rehearsing:
        @hookimpl
        def synthesize_rehearsal(
            self, role: str, examples: list[dict[str, Any]], wanted: int, settings: Settings
        ) -> list[dict[str, Any]]:
            return [{"prompt": f"{role} question {i}", "completion": "answer"} for i in range(wanted)]

    class Silent:
        @hookimpl
        def synthesize_rehearsal(
            self, role: str, examples: list[dict[str, Any]], wanted: int, settings: Settings
        ) -> None:
            return None

    host = PluginHost(load_settings(), load_entry_points=False)
    host.register(Rehearsing(), name="a")
    host.register(Silent(), name="b")
    rows = host.synthesize_rehearsal("coder", [], 2)
    assert rows == [{"prompt": "coder question 0", "completion": "answer"},
                    {"prompt": "coder question 1", "completion": "answer"}]


def test_hook_find_sensitive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    without = PluginHost(load_settings(), load_entry_points=False)
    assert without.find_sensitive("mail me at ada@example.com") is None  # nothing scans text
    with_privacy = PluginHost(load_settings(plugins={"enabled": ["privacy"]}))
    found = with_privacy.find_sensitive("mail ada@example.com or bob@example.org, key AKIAIOSFODNN7EXAMPLE")
    assert found is not None
    assert found.count("EMAIL") == 2 and "AWS_ACCESS_KEY" in found
    assert with_privacy.find_sensitive("def add(a, b): return a + b") == []


def test_registering_every_installed_plugin_imports_no_torch(tmp_path: Path) -> None:
    """``flywheel up`` registers every plugin's processors and projections, also when started ``--only`` for
    steps that never train or evaluate: the trainer's and the evaluator's modules (torch, transformers) load on
    their processors' first input (``plugins/shared/deferred.py``), not here. In a fresh interpreter, since
    this one may have imported torch for other tests."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from flywheel_loop.engine.config import load_settings\n"
        "from flywheel_loop.engine.plugin_host import PluginHost\n"
        f"host = PluginHost(load_settings(state_dir=Path({str(tmp_path)!r})))\n"
        "host.configure()\n"
        "names = sorted(p.name for p in host.processors()) + sorted(p.name for p in host.projections())\n"
        "print(' '.join(names))\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    names, torch_loaded = done.stdout.strip().splitlines()[-2:]
    assert {"trainer", "evaluator", "anonymizer", "scoring"} <= set(names.split())
    assert torch_loaded == "False"
