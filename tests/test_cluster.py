"""A 3-node JetStream cluster: a node and a worker die mid-stream; nothing is lost or doubled."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

from flywheel_loop.engine.bus import Bus
from flywheel_loop.engine.config import load_settings
from flywheel_loop.engine.embedded import EmbeddedCluster
from flywheel_loop.sdk.recorder import Recorder
from tests.conftest import wait_for
from tests.counting_plugin import counts

ROOT = Path(__file__).parent.parent


async def test_node_and_worker_killed_mid_stream_lose_nothing_and_double_nothing(tmp_path: Path) -> None:
    n = 3000
    with EmbeddedCluster(tmp_path / "cluster", size=3) as cluster:
        settings = load_settings(state_dir=tmp_path / "agent", nats={"url": cluster.url, "publish_retry_s": 60},
                                 streams={"replicas": 3})
        bus = await Bus.connect(settings, cluster.url)
        await bus.ensure_streams()  # waits for the cluster to elect its JetStream leader
        env = {**os.environ, "PYTHONPATH": str(ROOT), "FLYWHEEL_STREAMS__REPLICAS": "3",
               "FLYWHEEL_WORKER__ACK_WAIT_S": "3", "FLYWHEEL_NATS__PUBLISH_RETRY_S": "60"}
        workers = [
            subprocess.Popen([sys.executable, "-m", "tests.counting_plugin", cluster.url, str(tmp_path / f"w{i}")],
                             cwd=ROOT, env=env)
            for i in range(2)
        ]
        stores = [tmp_path / f"w{i}" / "projections" / "counted.sqlite" for i in range(2)]
        try:
            async with Recorder(settings, url=cluster.url) as rec:
                for i in range(n):
                    await rec.record_interaction(session_id=f"s{i % 5}", role="coder", model_id="m",
                                                 input=f"task {i}", output="ok")
                    if i == n // 3:
                        await rec.flush(60)
                        cluster.nodes[1].kill()  # a NATS node dies mid-stream
                    if i == 2 * n // 3:
                        await rec.flush(60)
                        await wait_for(lambda: stores[1].exists() and counts(stores[1])[0] > 0, timeout=60)
                        workers[1].send_signal(signal.SIGKILL)  # so does a worker
                        workers[1].wait()
                    if i % 200 == 0:
                        await asyncio.sleep(0)
                await rec.flush(120)
            await wait_for(lambda: counts(stores[0])[0] >= n, timeout=180, interval=0.2)
            await asyncio.sleep(1.0)  # a doubled delivery would land now
        finally:
            for w in workers:
                if w.poll() is None:
                    w.send_signal(signal.SIGTERM)
                    w.wait(30)
        total, distinct, rows = counts(stores[0])
        info = await bus.js.stream_info(bus.streams.log, subjects_filter="fw.log.interaction.anonymized")
        raw = await bus.js.stream_info(bus.streams.raw)
        keys = await bus.js.stream_info(f"KV_{settings.streams.prefix}_KEYS")
        await bus.close()
    assert raw.state.messages == n  # every agent event stored once, through the node failure
    assert (total, distinct, rows) == (n, n, n)  # the surviving worker's projection saw each output once
    assert sum(info.state.subjects.values()) == n  # and the log holds each output exactly once
    # the data keys sealing the outputs: replicated like the streams, one per interaction though two workers
    # sealed (one of them killed) and the node holding a replica died
    assert keys.config.num_replicas == 3 and keys.state.messages == n
