"""Access control and TLS against real servers configured from ops/nats."""

from __future__ import annotations

import asyncio
import re
import subprocess
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors
import pytest
from nats.js.api import AckPolicy, ConsumerConfig

from flywheel_loop.engine.bus import Bus, BusUnavailable, PublishFailed
from flywheel_loop.engine.config import Settings, load_settings
from flywheel_loop.engine.embedded import EmbeddedServer
from flywheel_loop.engine.plugin_host import PluginHost
from flywheel_loop.schemas import InteractionAnonymized, InteractionRecorded, QualityAssessed, new_event, new_id
from flywheel_loop.sdk.bandit import BanditConfig
from flywheel_loop.sdk.recorder import Recorder
from flywheel_loop.sdk.selector import Selector
from tests.conftest import read_log, wait_for

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


def _as(user: str, server: EmbeddedServer, tmp_path: Path, **nats: Any) -> Settings:
    password = PASSWORDS[f"FLYWHEEL_{user.upper()}_PASSWORD"]
    return load_settings(state_dir=tmp_path, nats={"url": server.url, "user": user, "password": password, **nats})


def _reward(variant: str, reward: float) -> Any:
    return new_event(QualityAssessed(interaction_id=new_id(), role="coder", prompt_variant=variant, scores={},
                                     reward=reward, confidence=1.0), source="scoring")


async def _refused(agent: Bus, call: Any, subject: str) -> None:
    """``call`` gets no answer (NATS drops what the credential may not publish) and the server says why."""
    before = len(agent.server_errors)
    with pytest.raises((nats.errors.TimeoutError, TimeoutError, nats.errors.NoRespondersError)):
        await call
    await wait_for(lambda: any(subject.lower() in e.lower() and "permissions violation" in e.lower()
                               for e in agent.server_errors[before:]), timeout=5)


async def test_the_agent_credential_runs_the_selector_and_the_recorder_and_can_read_nothing_else(
    secured: EmbeddedServer, tmp_path: Path
) -> None:
    engine = await Bus.connect(_as("engine", secured, tmp_path), secured.url)
    await engine.ensure_streams()
    for variant, reward in (("terse", 0.9), ("terse", 0.8), ("explain", 0.1)):
        await engine.publish(_reward(variant, reward))
    secret = new_event(InteractionRecorded(session_id="s", role="coder", model_id="m", input="the raw prompt",
                                           output="o"), source="agent")
    await engine.publish(secret)  # another agent's raw intake
    await engine.publish(new_event(InteractionAnonymized(interaction_id=secret.id, interaction=secret.data),
                                   source="anonymizer"))
    # the engine's own consumers on the log: an agent may not re-point them
    await engine.js.add_consumer(engine.streams.log, ConsumerConfig(
        durable_name="drift_monitor", name="drift_monitor", ack_policy=AckPolicy.EXPLICIT,
        filter_subjects=["fw.log.quality.assessed", "fw.log.deployment.completed"]))

    agent_settings = _as("agent", secured, tmp_path, publish_timeout_s=1.0, publish_retry_s=2)
    bandit = BanditConfig(prompt_variants={"coder": ["terse", "explain"]})
    async with Selector(bandit, agent_settings, url=secured.url, seed=1) as selector:
        assert selector.position == 3  # folded every reward on the log
        assert selector.state.stats("coder", "prompt_variant")["terse"].pulls == 2
        chosen = selector.select_prompt("coder")
        live = await engine.publish(_reward("explain", 0.7))  # followed live
        assert await selector.catch_up(timeout=10) == live.seq
        assert selector.state.stats("coder", "prompt_variant")["explain"].pulls == 2
        async with Recorder(agent_settings, url=secured.url) as rec:
            iid = await rec.record_interaction(session_id="s2", role="coder", model_id="m", input="i", output="o",
                                               prompt_variant=chosen)
    [choice] = await read_log(engine, "log", "arm.selected")
    assert (choice.data.arm, choice.data.role) == (chosen, "coder")
    assert iid in {e.id for e in await read_log(engine, "raw")}

    agent = await Bus.connect(agent_settings, secured.url)
    raw, log = agent.streams.raw, agent.streams.log
    try:
        # no other stream's content: not the raw intake, not the data keys, by consumer or by get
        await _refused(agent, agent.js.add_consumer(raw, ConsumerConfig(
            name="peek", deliver_subject=agent.nc.new_inbox(), ack_policy=AckPolicy.NONE,
            filter_subject="fw.raw.interaction.recorded")), f"$JS.API.CONSUMER.CREATE.{raw}")
        await _refused(agent, agent.js.get_msg(raw, seq=1), f"$JS.API.STREAM.MSG.GET.{raw}")
        await _refused(agent, agent.js.get_last_msg(raw, "fw.raw.interaction.recorded", direct=True),
                       f"$JS.API.DIRECT.GET.{raw}")
        await _refused(agent, agent.js.get_msg("KV_FLYWHEEL_KEYS", seq=1), "$JS.API.STREAM.MSG.GET.KV_FLYWHEEL_KEYS")
        # on the log, nothing but the rewards: no other filter, no unnamed consumer, no other subject's message
        await _refused(agent, agent.js.add_consumer(log, ConsumerConfig(
            name="peek", deliver_subject=agent.nc.new_inbox(), ack_policy=AckPolicy.NONE,
            filter_subject="fw.log.interaction.anonymized")), f"$JS.API.CONSUMER.CREATE.{log}.peek")
        await _refused(agent, agent.js.add_consumer(log, ConsumerConfig(
            deliver_subject=agent.nc.new_inbox(), ack_policy=AckPolicy.NONE)), f"$JS.API.CONSUMER.CREATE.{log}")
        await _refused(agent, agent.js.get_last_msg(log, "fw.log.interaction.anonymized", direct=True),
                       f"$JS.API.DIRECT.GET.{log}.fw.log.interaction.anonymized")
        await _refused(agent, agent.js.get_msg(log, seq=1), f"$JS.API.STREAM.MSG.GET.{log}")
        await _refused(agent, agent.js.add_consumer(log, ConsumerConfig(
            name="drift_monitor", durable_name="drift_monitor", ack_policy=AckPolicy.EXPLICIT,
            filter_subject="fw.log.quality.assessed")), f"$JS.API.CONSUMER.CREATE.{log}.drift_monitor")
        # no stream or consumer administration
        await _refused(agent, agent.js.delete_stream(log), f"$JS.API.STREAM.DELETE.{log}")
        await _refused(agent, agent.js.purge_stream(raw), f"$JS.API.STREAM.PURGE.{raw}")
        await _refused(agent, agent.js.delete_consumer(log, "drift_monitor"), f"$JS.API.CONSUMER.DELETE.{log}")
        # no listening in: not on the intake subjects, not on the engine's inboxes
        heard: list[Any] = []

        async def hear(msg: Any) -> None:
            heard.append(msg)

        before = len(agent.server_errors)
        await agent.nc.subscribe("fw.raw.>", cb=hear)
        await agent.nc.subscribe("_INBOX_engine.>", cb=hear)
        await wait_for(lambda: sum("permissions violation for subscription" in e.lower()
                                   for e in agent.server_errors[before:]) == 2, timeout=5)
        await engine.publish(secret)  # a duplicate: JetStream acks it on the engine's inbox
        await engine.js.get_msg(raw, seq=1)  # the engine reads the raw stream: its answer goes to its inbox
        await asyncio.sleep(0.5)
        assert heard == []
    finally:
        await agent.close()
        await engine.close()


def test_the_agent_may_not_re_point_any_built_in_consumer_on_the_log(tmp_path: Path) -> None:
    conf = (ROOT / "ops" / "nats" / "accounts.conf").read_text()
    denied = set(re.findall(r'"\$JS\.API\.CONSUMER\.CREATE\.FLYWHEEL_LOG\.([a-z_]+)\.>"', conf))
    settings = load_settings(state_dir=tmp_path)
    on_the_log = {p.name for p in PluginHost(settings).processors() if p.stream == "log"}
    assert on_the_log and on_the_log <= denied


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
