"""The agent SDK installs on its own: into a fresh virtual environment, from the schemas and the
SDK distributions and their wheels alone (offline, from the wheelhouse ``ops/setup`` fills), with
no torch, no engine; and an agent there records to a real NATS server."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest

from flywheel_loop.engine.bus import Bus
from tests.conftest import read_log

ROOT = Path(__file__).parent.parent
WHEELHOUSE = Path(sys.prefix) / "wheelhouse-sdk"

AGENT = """
import asyncio, sys
from flywheel_loop.sdk import NatsOptions, Recorder

async def main():
    async with Recorder(NatsOptions(url=sys.argv[1]), source="light-agent") as rec:
        iid = await rec.record_interaction(session_id="s1", role="coder", model_id="m", input="q", output="a")
        await rec.record_outcome(iid, tests_passed=3, tests_failed=0)
    print(iid)

asyncio.run(main())
"""


@pytest.fixture(scope="module")
def light_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not WHEELHOUSE.is_dir():
        pytest.skip(f"no wheelhouse at {WHEELHOUSE}: run bash ops/setup")
    folder = tmp_path_factory.mktemp("light") / "venv"
    venv.EnvBuilder(with_pip=True).create(folder)
    python = folder / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-index", "--find-links", str(WHEELHOUSE),
         str(ROOT / "schemas"), str(ROOT / "contrib" / "sdk")],
        capture_output=True, text=True, timeout=300,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    return python


def test_the_sdk_installs_without_torch_or_the_engine(light_venv: Path) -> None:
    listed = subprocess.run([str(light_venv), "-m", "pip", "list", "--format=freeze"], capture_output=True,
                            text=True, timeout=60).stdout.lower()
    names = {line.split("==")[0] for line in listed.split()}
    assert {"flywheel-loop-sdk", "flywheel-loop-schemas", "nats-py", "pydantic"} <= names
    assert not names & {"torch", "transformers", "lancedb", "flywheel-loop", "peft"}
    probe = "import flywheel_loop.sdk, importlib.util; print(importlib.util.find_spec('flywheel_loop.engine'))"
    out = subprocess.run([str(light_venv), "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "None"


async def test_an_agent_with_only_the_sdk_records_to_the_bus(light_venv: Path, bus: Bus) -> None:
    done = subprocess.run([str(light_venv), "-c", AGENT, bus.url], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    iid = done.stdout.strip()
    raw = await read_log(bus, "raw")
    assert [e.type for e in raw] == ["interaction.recorded", "outcome.observed"]
    assert raw[0].id == iid and raw[0].source == "light-agent" and raw[1].data.interaction_id == iid
