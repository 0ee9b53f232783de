"""Retention per stream from the configuration, and encryption at rest of the embedded server."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from typer.testing import CliRunner

from flywheel_loop.engine.bus import DAY_S, Bus
from flywheel_loop.engine.config import ConfigError, Settings, load_settings
from flywheel_loop.engine.connection import open_bus
from flywheel_loop.engine.embedded import EmbeddedServer
from flywheel_loop.plugins.privacy.forgetting import ForgetError, forget
from flywheel_loop.schemas import InteractionRecorded, new_event
from tests.conftest import read_log

PLANTED = "planted-plaintext-zebra-quokka-4711"
KEY = "correct-horse-battery-staple-42"


async def _config(bus: Bus, name: str) -> StreamConfig:
    return (await bus.js.stream_info(name)).config


async def test_stream_retention_follows_the_configuration_and_updates_existing_streams(
    settings_with: Callable[..., Settings],
) -> None:
    first = settings_with(streams={"raw_max_age_days": 7, "raw_max_bytes": 5_000_000, "log_max_bytes": 0})
    bus = await Bus.connect(first, first.nats.url or "")
    try:
        await bus.ensure_streams()
        raw, log = await _config(bus, bus.streams.raw), await _config(bus, bus.streams.log)
        assert raw.max_age == 7 * DAY_S and raw.max_bytes == 5_000_000
        assert log.max_age == 0 and log.max_bytes == -1  # the log keeps everything by default
        assert raw.deny_delete is False and raw.deny_purge is False  # forget erases from it
        assert log.deny_delete is True and log.deny_purge is True  # the log is immutable
    finally:
        await bus.close()

    # a restart with other values brings the existing streams to them
    second = settings_with(streams={"raw_max_age_days": 2.5, "log_max_age_days": 400, "log_max_bytes": 10**9})
    bus = await Bus.connect(second, second.nats.url or "")
    try:
        await bus.ensure_streams()
        raw, log = await _config(bus, bus.streams.raw), await _config(bus, bus.streams.log)
        assert raw.max_age == 2.5 * DAY_S and raw.max_bytes == -1
        assert log.max_age == 400 * DAY_S and log.max_bytes == 10**9
        assert log.deny_delete is True and log.deny_purge is True
    finally:
        await bus.close()


def test_bad_retention_values_are_refused_with_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="streams.raw_max_bytes"):
        load_settings(streams={"raw_max_bytes": -5})
    with pytest.raises(ConfigError, match="streams.raw_max_age_days"):
        load_settings(streams={"raw_max_age_days": 0})


async def test_a_raw_stream_that_denies_deletes_is_kept_and_forget_says_why(
    settings_with: Callable[..., Settings],
) -> None:
    settings = settings_with()
    bus = await Bus.connect(settings, settings.nats.url or "")
    try:
        # what an older version created: the raw stream denying deletes
        await bus.js.add_stream(StreamConfig(
            name=bus.streams.raw, subjects=["fw.raw.>"], storage=StorageType.FILE, retention=RetentionPolicy.LIMITS,
            discard=DiscardPolicy.OLD, max_age=30 * DAY_S, deny_delete=True,
        ))
        await bus.ensure_streams()  # does not fail: retention is updated, the deny flag stays
        assert (await _config(bus, bus.streams.raw)).deny_delete is True
        await bus.publish(new_event(InteractionRecorded(session_id="s-old", role="coder", model_id="m",
                                                        input="q", output="a"), source="agent"))
        with pytest.raises(ForgetError, match="does not allow deleting"):
            await forget(settings, bus, session="s-old")
    finally:
        await bus.close()


def _stream_files(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.suffix != ".log")


async def _store_planted(settings: Settings) -> None:
    async with open_bus(settings) as bus:
        await bus.publish(new_event(InteractionRecorded(session_id="s1", role="coder", model_id="m",
                                                        input=f"please keep {PLANTED} safe", output="ok"),
                                    source="agent"))


@pytest.mark.parametrize("encrypted", [True, False], ids=["with-key", "without-key"])
async def test_the_embedded_server_encrypts_its_files_at_rest_with_a_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, encrypted: bool
) -> None:
    monkeypatch.chdir(tmp_path)
    nats = {"embedded_encryption_key": KEY} if encrypted else {}
    settings = load_settings(state_dir=tmp_path / "state", nats=nats)
    await _store_planted(settings)  # the engine's own embedded server, started and stopped
    data_dir = settings.state_dir / "nats"
    on_disk = _stream_files(data_dir / "jetstream")
    assert b"fw.raw.interaction.recorded" in on_disk or encrypted  # the files are really there
    assert (PLANTED.encode() in on_disk) is not encrypted
    assert KEY.encode() not in on_disk and KEY not in (data_dir / "nats-server.log").read_text()
    for conf in data_dir.glob("*.conf"):
        assert KEY not in conf.read_text()  # the key reaches the server through its environment

    # restarted with the same key, the server reads its data back
    server = EmbeddedServer(data_dir, encryption_key=KEY if encrypted else None).start()
    try:
        other = load_settings(state_dir=tmp_path / "state", nats={"url": server.url})
        bus = await Bus.connect(other, server.url)
        try:
            [event] = await read_log(bus, "raw")
            assert PLANTED in event.data.input
        finally:
            await bus.close()
    finally:
        server.stop()


def test_the_encryption_key_is_validated_and_never_shown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="nats.embedded_encryption_key") as refused:
        load_settings(nats={"embedded_encryption_key": "short key"})
    assert "short key" not in str(refused.value)  # not even a bad key is echoed
    key_file = tmp_path / "js.key"
    key_file.write_text("has a space in it and is long\n")
    with pytest.raises(ConfigError, match="embedded_encryption_key_file"):
        load_settings(nats={"embedded_encryption_key_file": key_file}).nats.encryption_key()
    key_file.write_text(KEY + "\n")
    assert load_settings(nats={"embedded_encryption_key_file": key_file}).nats.encryption_key() == KEY

    from flywheel_loop.engine.cli import app

    monkeypatch.setenv("FLYWHEEL_NATS__EMBEDDED_ENCRYPTION_KEY", KEY)
    result = CliRunner().invoke(app, ["config", "show", "--json"])
    assert result.exit_code == 0, result.output
    assert KEY not in result.output
    assert json.loads(result.output)["nats"]["embedded_encryption_key"] == "***"
