"""The flywheel command against a real server."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

from flywheel_loop.engine.cli import app, build_app
from flywheel_loop.engine.config import Settings
from flywheel_loop.engine.embedded import EmbeddedServer

EXAMPLES = Path(__file__).parent.parent / "schemas" / "examples"
runner = CliRunner()


@pytest.fixture
def env(settings: Settings, nats_server: EmbeddedServer, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("FLYWHEEL_NATS__URL", nats_server.url)
    monkeypatch.setenv("FLYWHEEL_STATE_DIR", str(settings.state_dir))
    monkeypatch.setenv("FLYWHEEL_DASHBOARD__PORT", "0")  # `up` serves the dashboard: on a free port
    monkeypatch.setenv("FLYWHEEL_GATEWAY__PORT", "0")  # and the gateway
    return {}


def test_record_validates_then_publishes_and_events_lists_them(env: dict[str, str], tmp_path: Path) -> None:
    body = orjson.loads((EXAMPLES / "interaction.recorded.json").read_bytes())
    for key in ("id", "time", "source"):
        body.pop(key)  # filled in by record
    (tmp_path / "one.json").write_bytes(orjson.dumps(body))
    result = runner.invoke(app, ["record", str(tmp_path / "one.json")])
    assert result.exit_code == 0, result.output
    assert "recorded interaction.recorded" in result.output
    listed = runner.invoke(app, ["events", "--stream", "raw", "--json"])
    assert listed.exit_code == 0, listed.output
    events = [orjson.loads(line) for line in listed.output.splitlines() if line.startswith("{")]
    assert len(events) == 1 and events[0]["source"] == "cli"


def test_record_refuses_an_invalid_batch_entirely(env: dict[str, str], tmp_path: Path) -> None:
    good = (EXAMPLES / "interaction.recorded.json").read_bytes()
    bad = orjson.loads((EXAMPLES / "feedback.given.json").read_bytes())
    bad["data"]["rating"] = 9
    (tmp_path / "batch.jsonl").write_bytes(orjson.dumps(orjson.loads(good)) + b"\n" + orjson.dumps(bad) + b"\n")
    result = runner.invoke(app, ["record", str(tmp_path / "batch.jsonl")])
    assert result.exit_code == 1
    assert "event 2: data.rating" in result.output and "nothing was published" in result.output
    listed = runner.invoke(app, ["events", "--stream", "raw", "--json"])
    assert [line for line in listed.output.splitlines() if line.startswith("{")] == []


def test_status_reports_streams_and_rejections(env: dict[str, str]) -> None:
    result = runner.invoke(app, ["status", "--json"])
    assert result.exit_code == 0, result.output
    st = orjson.loads(result.output)
    assert {s["name"] for s in st["streams"]} == {"FLYWHEEL_RAW", "FLYWHEEL_LOG"}
    assert st["rejected"] == 0
    assert "log_index" in {p["name"] for p in st["projections"]}


def test_unreachable_bus_is_one_clear_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLYWHEEL_NATS__URL", "nats://127.0.0.1:9")
    monkeypatch.setenv("FLYWHEEL_NATS__CONNECT_TIMEOUT_S", "0.5")
    result = runner.invoke(app, ["status"])
    assert result.exit_code == 2
    assert "error: cannot reach NATS at nats://127.0.0.1:9" in result.output


def test_bad_configuration_is_reported_with_the_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLYWHEEL_WORKER__BATCH", "-1")
    result = runner.invoke(app, ["config", "show"])
    assert result.exit_code == 2 and "worker.batch = '-1'" in result.output


def test_a_bad_engine_setting_in_the_environment_still_builds_the_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # the commands are listed before any is run: a bad engine value must not break that with a traceback
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLYWHEEL_MODELS__PRECISION", "fp16")
    result = runner.invoke(build_app(), ["config", "show"])
    assert result.exit_code == 2, result.output
    assert "models.precision" in result.output and "Traceback" not in result.output


def test_config_show_masks_secrets(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLYWHEEL_NATS__PASSWORD", "hunter2")
    result = runner.invoke(app, ["config", "show", "--json"])
    assert result.exit_code == 0 and "hunter2" not in result.output
    assert orjson.loads(result.output)["nats"]["password"] == "***"


def test_replay_compare_finds_the_rebuilt_projection_identical(env: dict[str, str]) -> None:
    assert runner.invoke(app, ["record", str(EXAMPLES / "quality.assessed.json")]).exit_code == 0
    up = runner.invoke(app, ["up", "--only", "log_index", "--duration", "3"])
    assert up.exit_code == 0, up.output
    result = runner.invoke(app, ["replay", "--projection", "log_index", "--compare"])
    assert result.exit_code == 0, result.output
    assert "identical" in result.output


def test_train_requests_a_run_on_the_log(env: dict[str, str]) -> None:
    result = runner.invoke(app, ["train", "--role", "coder", "--no-wait"])
    assert result.exit_code == 0, result.output
    listed = runner.invoke(app, ["events", "--type", "training.requested", "--json"])
    events = [orjson.loads(line) for line in listed.output.splitlines() if line.startswith("{")]
    assert len(events) == 1 and events[0]["data"]["role"] == "coder" and events[0]["data"]["reason"] == "manual"


def test_datasets_and_dataset_replay_without_data_say_so(env: dict[str, str]) -> None:
    assert runner.invoke(app, ["datasets"]).exit_code == 0
    shown = runner.invoke(app, ["datasets", "show", "abc123"])
    assert shown.exit_code == 2 and "no dataset 'abc123'" in shown.output
    replayed = runner.invoke(app, ["replay", "--dataset", "coder", "--until", "5"])
    assert replayed.exit_code == 1 and "no dataset" in replayed.output
    assert runner.invoke(app, ["replay", "--dataset", "coder"]).exit_code == 2  # --until is required


FEATURES = ["privacy", "scoring", "curation", "training", "evaluation", "serving", "insight", "demo"]


@pytest.mark.parametrize("feature", FEATURES)
def test_the_engine_runs_and_helps_without_any_one_feature(
    env: dict[str, str], feature: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flywheel_loop.engine.cli import build_app

    monkeypatch.setenv("FLYWHEEL_PLUGINS__DISABLED", f'["{feature}"]')
    monkeypatch.setenv("FLYWHEEL_PLUGINS__SKIP", '["trainer", "evaluator", "deployer"]')  # no real model here
    without = build_app()
    helped = runner.invoke(without, ["--help"])
    assert helped.exit_code == 0, helped.output
    ran = runner.invoke(without, ["up", "--duration", "1"])
    assert ran.exit_code == 0, ran.output
    assert "stopped: in-flight work drained" in ran.output
    listed = runner.invoke(without, ["plugins", "--json"])
    rows = {r["plugin"]: r for r in orjson.loads(listed.output)}
    assert rows[feature]["enabled"] is False and all(rows[f]["enabled"] for f in FEATURES if f != feature)


def test_a_feature_brings_its_own_commands() -> None:
    from flywheel_loop.engine.cli import build_app

    def commands(app: object) -> set[str]:
        out = runner.invoke(app, ["--help"]).output  # type: ignore[arg-type]
        return {name for name in ("train", "deployments", "rollback", "forget", "stats", "runs", "dashboard",
                                  "datasets", "demo") if f"│ {name} " in out}

    everything = commands(build_app())
    assert everything == {
        "train", "deployments", "rollback", "forget", "stats", "runs", "dashboard", "datasets", "demo",
    }


def test_user_facing_errors_keep_their_brackets() -> None:
    """A validation error quoting a regular expression is printed as it is (no markup eaten)."""
    result = runner.invoke(app, ["rollback", "--role", "Bad[x]"])
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "'^[a-z][a-z0-9_-]{0,31}$'" in text and "'Bad[x]'" in text


def test_plugins_lists_what_each_feature_registers(env: dict[str, str]) -> None:
    result = runner.invoke(app, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["plugin"]: r for r in orjson.loads(result.output)}
    assert rows["training"]["settings"] == ["[trainer]"] and rows["training"]["processors"] == ["trainer"]
    assert rows["training"]["commands"] == ["train"]
    assert set(rows["serving"]["runtimes"]) == {"transformers", "llama_cpp", "ollama"}
    assert rows["insight"]["services"] == ["dashboard"]
    assert rows["demo"]["commands"] == ["demo"]


def test_up_serves_the_gateway_and_gateway_serves_alone(env: dict[str, str]) -> None:
    up = runner.invoke(app, ["up", "--only", "log_index", "--only", "gateway", "--duration", "2"])
    assert up.exit_code == 0, up.output
    assert "gateway: http://127.0.0.1:" in up.output
    alone = runner.invoke(app, ["gateway", "--duration", "1"])
    assert alone.exit_code == 0, alone.output
    assert "flywheel gateway at http://127.0.0.1:" in alone.output
    hashed = runner.invoke(app, ["gateway", "hash-key", "secret"])
    assert hashed.output.strip() == "2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b"
