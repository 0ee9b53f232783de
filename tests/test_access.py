"""Access control and TLS against real servers configured from ops/nats."""

from __future__ import annotations

import subprocess
from pathlib import Path

import nats.errors
import pytest

from flywheel_loop.engine.bus import Bus, BusUnavailable, PublishFailed
from flywheel_loop.engine.config import load_settings
from flywheel_loop.engine.embedded import EmbeddedServer
from flywheel_loop.schemas import QualityAssessed, new_event
from flywheel_loop.sdk.recorder import Recorder
from tests.conftest import read_log

ROOT = Path(__file__).parent.parent
PASSWORDS = {"FLYWHEEL_ENGINE_PASSWORD": "engine-secret-1", "FLYWHEEL_AGENT_PASSWORD": "agent-secret-2"}


@pytest.fixture
def secured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> EmbeddedServer:
    for key, value in PASSWORDS.items():
        monkeypatch.setenv(key, value)  # the server reads them from its environment
    server = EmbeddedServer(tmp_path / "nats", config_file=ROOT / "ops" / "nats" / "accounts.conf").start()
    yield server
    server.stop()


async def test_an_agent_credential_may_only_publish_intake(secured: EmbeddedServer, tmp_path: Path) -> None:
    engine_settings = load_settings(state_dir=tmp_path, nats={"url": secured.url, "user": "engine",
                                                              "password": PASSWORDS["FLYWHEEL_ENGINE_PASSWORD"]})
    engine = await Bus.connect(engine_settings, secured.url)
    await engine.ensure_streams()  # the engine's credential administers the streams

    agent_settings = load_settings(state_dir=tmp_path, nats={
        "url": secured.url, "user": "agent", "password": PASSWORDS["FLYWHEEL_AGENT_PASSWORD"], "publish_retry_s": 2})
    async with Recorder(agent_settings, url=secured.url) as rec:
        iid = await rec.record_interaction(session_id="s", role="coder", model_id="m", input="i", output="o")
    assert [e.id for e in await read_log(engine, "raw")] == [iid]

    agent = await Bus.connect(agent_settings, secured.url)
    forged = new_event(QualityAssessed(interaction_id=iid, role="coder", scores={}, reward=1.0, confidence=1.0),
                       source="agent")
    with pytest.raises(PublishFailed, match="(?i)permissions violation for publish to \"?fw.log.quality.assessed"):
        await agent.publish(forged)
    with pytest.raises(nats.errors.TimeoutError):  # no stream administration either: the request is dropped
        await agent.js.delete_stream(agent.streams.log)
    assert any("permissions violation for publish to \"$js.api.stream.delete" in e.lower() for e in agent.server_errors)
    await agent.close()
    assert await read_log(engine, "log") == []
    assert await engine.last_sequence("raw") == 1
    await engine.close()


async def test_a_wrong_password_is_a_clear_error(secured: EmbeddedServer, tmp_path: Path) -> None:
    settings = load_settings(state_dir=tmp_path, nats={"user": "agent", "password": "wrong", "connect_timeout_s": 2})
    with pytest.raises(BusUnavailable, match="cannot reach NATS"):
        await Bus.connect(settings, secured.url)


def _self_signed(tmp: Path) -> tuple[Path, Path, Path]:
    ca_key, ca, key, csr, cert = (tmp / n for n in ("ca-key.pem", "ca.pem", "key.pem", "req.csr", "cert.pem"))
    run = lambda *a: subprocess.run(["openssl", *a], check=True, capture_output=True)  # noqa: E731
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca), "-days", "1",
        "-subj", "/CN=flywheel-test-ca")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1")
    ext = tmp / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial", "-out", str(cert),
        "-days", "1", "-extfile", str(ext))
    return ca, cert, key


async def test_tls_with_a_self_signed_certificate(tmp_path: Path) -> None:
    ca, cert, key = _self_signed(tmp_path)
    conf = tmp_path / "tls.conf"
    conf.write_text(f'tls {{\n  cert_file: "{cert}"\n  key_file: "{key}"\n  timeout: 2\n}}\n')
    with EmbeddedServer(tmp_path / "nats", config_file=conf) as server:
        url = f"tls://127.0.0.1:{server.port}"
        good = load_settings(state_dir=tmp_path, nats={"url": url, "tls_ca": str(ca)})
        bus = await Bus.connect(good, url)
        await bus.ensure_streams()
        async with Recorder(good, url=url) as rec:
            await rec.record_interaction(session_id="s", role="coder", model_id="m", input="i", output="o")
        assert await bus.last_sequence("raw") == 1
        await bus.close()
        # without the CA the certificate is not trusted: refused, with a clear error
        untrusted = load_settings(state_dir=tmp_path, nats={"url": url, "connect_timeout_s": 2})
        with pytest.raises(BusUnavailable, match="cannot reach NATS"):
            await Bus.connect(untrusted, url)
