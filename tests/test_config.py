"""Configuration: defaults < TOML < environment; bad values name the key, value and rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from flywheel_loop.engine.config import ConfigError, load_settings
from flywheel_loop.engine.plugin_host import PluginHost


def test_defaults_run_on_one_laptop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    s = load_settings()
    assert s.nats.url is None  # embedded server
    assert s.streams.raw_max_age_days == 30


def test_toml_then_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "flywheel.toml").write_text('[nats]\nurl = "nats://10.0.0.1:4222"\n[worker]\nbatch = 64\n')
    monkeypatch.setenv("FLYWHEEL_WORKER__BATCH", "32")
    s = load_settings()
    assert s.nats.url == "nats://10.0.0.1:4222" and s.worker.batch == 32


def test_a_bad_value_names_key_value_and_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "flywheel.toml").write_text('[worker]\nbatch = 0\n[streams]\nreplicas = 9\n')
    with pytest.raises(ConfigError) as info:
        load_settings()
    msg = str(info.value)
    assert "worker.batch = 0: Input should be greater than or equal to 1" in msg
    assert "streams.replicas = 9: Input should be less than or equal to 5" in msg


def test_unknown_keys_and_bad_urls_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "flywheel.toml").write_text('[nats]\nurl = "http://x"\nspeed = 3\n')
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "nats.url = 'http://x'" in str(info.value) and "nats.speed = 3: no such setting" in str(info.value)


def test_unreadable_or_missing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLYWHEEL_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError, match="no such file"):
        load_settings()
    (tmp_path / "bad.toml").write_text("[worker\n")
    monkeypatch.setenv("FLYWHEEL_CONFIG", str(tmp_path / "bad.toml"))
    with pytest.raises(ConfigError, match="cannot read configuration"):
        load_settings()


def test_enabling_a_plugin_that_is_not_installed_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"\['no_such_plugin'\] not installed"):
        PluginHost(load_settings(plugins={"enabled": ["no_such_plugin"]}))


def test_disabled_plugins_are_not_loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    everything = PluginHost(load_settings()).names
    assert "insight" in everything
    without = PluginHost(load_settings(plugins={"disabled": ["insight"]})).names
    assert set(everything) - set(without) == {"insight"}
