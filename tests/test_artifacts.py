"""The artifact store on a real nats-server: folders published as chunked objects, fetched back
byte for byte into an empty state folder, refused when they fail a check, erased on delete, and
replicated on a 3-node cluster."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from flywheel_loop.engine.artifacts import ArtifactCorrupt, ArtifactMissing, ArtifactStore
from flywheel_loop.engine.bus import Bus
from flywheel_loop.engine.config import Settings, load_settings
from flywheel_loop.engine.embedded import EmbeddedCluster


def make_folder(root: Path, seed: int = 0) -> Path:
    """Files of several sizes (one larger than many chunks), a nested folder, and scratch dot-files."""
    root.mkdir(parents=True)
    (root / "manifest.json").write_text(json.dumps({"seed": seed}))
    (root / "weights.bin").write_bytes(bytes((i * 7 + seed) % 251 for i in range(300_000)))
    (root / "empty.txt").write_bytes(b"")
    (root / "ckpt-00000002").mkdir()
    (root / "ckpt-00000002" / "state.json").write_text('{"step": 2}')
    (root / ".lock").write_text("")
    (root / ".tmp-half-written").mkdir()
    (root / ".tmp-half-written" / "x").write_text("never published")
    return root


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def published(folder: Path) -> dict[str, bytes]:
    return {k: v for k, v in files_of(folder).items() if not any(part.startswith(".") for part in k.split("/"))}


@pytest.fixture
def machine(tmp_path: Path, nats_server: Any, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Settings]:
    """Settings for one 'machine': its own state folder on the shared test server."""
    monkeypatch.chdir(tmp_path)

    def make(name: str, **artifacts: Any) -> Settings:
        return load_settings(state_dir=tmp_path / name, nats={"url": nats_server.url},
                             artifacts={"chunk_kib": 4, "stall_timeout_s": 1.0, **artifacts})

    return make


async def connect(settings: Settings) -> Bus:
    bus = await Bus.connect(settings, settings.nats.url or "")
    await bus.ensure_streams()
    return bus


async def chunk_messages(bus: Bus) -> int:
    info = await bus.js.stream_info(bus.artifacts.stream, subjects_filter=f"$O.{bus.artifacts.bucket}.C.>")
    return sum((info.state.subjects or {}).values())


async def test_a_folder_made_on_one_machine_is_fetched_byte_for_byte_on_another(
    machine: Callable[..., Settings],
) -> None:
    a, b = await connect(machine("a")), await connect(machine("b"))
    try:
        folder = make_folder(a.settings.layout.artifact("runs", "coder-abc-1"))
        info = await a.artifacts.publish("runs", "coder-abc-1", headers={"Flywheel-Step": "2"})
        assert info is not None and info.chunks > 10  # 300 KB in 4 KiB chunks
        assert info.headers["Flywheel-Step"] == "2" and info.headers["Flywheel-Files"] == "4"

        seen = await b.artifacts.info("runs", "coder-abc-1")
        assert seen is not None and seen.sha256 == info.sha256 and seen.headers["Flywheel-Step"] == "2"
        fetched = await b.artifacts.local("runs", "coder-abc-1")
        assert fetched == b.settings.layout.artifact("runs", "coder-abc-1")
        assert files_of(fetched) == published(folder)  # byte for byte; dot-files are scratch, not published
        assert not (fetched / ".lock").exists()

        # deleting the state folder loses nothing: the next use fetches it again
        shutil.rmtree(b.settings.state_dir)
        again = await b.artifacts.local("runs", "coder-abc-1")
        assert files_of(again) == published(folder)

        # publishing what is already there uploads nothing
        before = await chunk_messages(a)
        assert (await b.artifacts.publish("runs", "coder-abc-1", again)) == seen
        assert await chunk_messages(a) == before
        # the same files give the same object (the archive is deterministic)
        shutil.rmtree(folder)
        make_folder(folder)
        replaced = await a.artifacts.publish("runs", "coder-abc-1", replace=True)
        assert replaced is not None and replaced.sha256 == info.sha256
        assert await chunk_messages(a) == before  # the old chunks were purged

        # a newer version of a mutable artifact replaces the cached folder
        (folder / "ckpt-00000002" / "state.json").write_text('{"step": 4}')
        await a.artifacts.publish("runs", "coder-abc-1", headers={"Flywheel-Step": "4"}, replace=True)
        await b.artifacts.fetch("runs", "coder-abc-1")
        assert (again / "ckpt-00000002" / "state.json").read_text() == '{"step": 4}'
        assert [p.name for p in again.parent.iterdir()] == ["coder-abc-1"]  # no scratch left behind

        listed = await b.artifacts.objects()
        assert [x.name for x in listed] == ["runs/coder-abc-1"]
    finally:
        await a.close()
        await b.close()


async def test_missing_and_corrupt_objects_are_refused_with_the_reason_and_leave_nothing(
    machine: Callable[..., Settings],
) -> None:
    a, b = await connect(machine("a")), await connect(machine("b"))
    try:
        with pytest.raises(ArtifactMissing, match="datasets/" + "0" * 64 + " is neither"):
            await b.artifacts.local("datasets", "0" * 64)

        # bytes that do not match the SHA-256 recorded in the object's metadata
        make_folder(a.settings.layout.artifact("adapters", "1" * 64))
        await a.artifacts.publish("adapters", "1" * 64)
        store = await a.js.object_store(a.artifacts.bucket)
        meta = await store.get_info("adapters/" + "1" * 64)
        meta_subject = f"$O.{a.artifacts.bucket}.M.{base64.urlsafe_b64encode(meta.name.encode()).decode()}"
        tampered = {**meta.as_dict(), "digest": "SHA-256=" + base64.urlsafe_b64encode(b"\0" * 32).decode()}
        await a.js.publish(meta_subject, json.dumps(tampered).encode(), headers={"Nats-Rollup": "sub"})
        with pytest.raises(ArtifactCorrupt, match="SHA-256 of the bytes"):
            await b.artifacts.local("adapters", "1" * 64)
        assert not b.settings.layout.adapters.exists() or not any(b.settings.layout.adapters.iterdir())

        # content that is not what its key claims: the caller's verifier refuses it
        make_folder(a.settings.layout.artifact("datasets", "2" * 64), seed=1)
        await a.artifacts.publish("datasets", "2" * 64)

        def claims(folder: Path) -> str | None:
            seed = json.loads((folder / "manifest.json").read_text())["seed"]
            return None if seed == 0 else f"manifest seed {seed}, the key says 0"

        with pytest.raises(ArtifactCorrupt, match="fails verification: manifest seed 1"):
            await b.artifacts.local("datasets", "2" * 64, verify=claims)
        assert not b.settings.layout.datasets.exists() or not any(b.settings.layout.datasets.iterdir())

        # chunks gone from the bus: a clear error after the stall timeout, not a hang
        make_folder(a.settings.layout.artifact("models", "tiny-abc"))
        await a.artifacts.publish("models", "tiny-abc")
        meta = await store.get_info("models/tiny-abc")
        await a.js.purge_stream(a.artifacts.stream, subject=f"$O.{a.artifacts.bucket}.C.{meta.nuid}")
        with pytest.raises(ArtifactCorrupt, match="only 0 of its [0-9]+ chunks are on the bus"):
            await b.artifacts.local("models", "tiny-abc")
        assert not (b.settings.layout.models / "tiny-abc").exists()
    finally:
        await a.close()
        await b.close()


async def test_delete_erases_the_chunks_and_the_object(machine: Callable[..., Settings]) -> None:
    a = await connect(machine("a"))
    try:
        make_folder(a.settings.layout.artifact("datasets", "3" * 64))
        await a.artifacts.publish("datasets", "3" * 64)
        assert await chunk_messages(a) > 0
        assert await a.artifacts.delete("datasets", "3" * 64)
        assert await chunk_messages(a) == 0
        assert await a.artifacts.info("datasets", "3" * 64) is None
        assert not await a.artifacts.delete("datasets", "3" * 64)
        shutil.rmtree(a.settings.layout.datasets)
        with pytest.raises(ArtifactMissing):
            await a.artifacts.local("datasets", "3" * 64)
    finally:
        await a.close()


async def test_switched_off_artifacts_stay_local(machine: Callable[..., Settings]) -> None:
    a = await connect(machine("a", enabled=False))
    try:
        make_folder(a.settings.layout.artifact("datasets", "4" * 64))
        assert await a.artifacts.publish("datasets", "4" * 64) is None
        assert await a.artifacts.local("datasets", "4" * 64) == a.settings.layout.artifact("datasets", "4" * 64)
        with pytest.raises(ArtifactMissing, match="artifacts.enabled is false"):
            await a.artifacts.local("datasets", "5" * 64)
        with pytest.raises(Exception):  # noqa: B017 - no bucket was made
            await a.js.object_store(a.artifacts.bucket)
    finally:
        await a.close()


async def test_a_worker_thread_publishes_in_the_background_and_fetches(machine: Callable[..., Settings]) -> None:
    a, b = await connect(machine("a")), await connect(machine("b"))
    try:
        folder = make_folder(a.settings.layout.artifact("runs", "r1"))
        ta, tb = a.artifacts.in_thread(), b.artifacts.in_thread()

        def in_a_thread() -> dict[str, bytes]:
            pending = ta.publish_soon("runs", "r1", folder, {"Flywheel-Step": "2"})
            # the folder changes right after: the object is the folder as it was when asked
            (folder / "manifest.json").write_text('{"seed": 99}')
            pending.result(30)
            return files_of(tb.local("runs", "r1"))

        got = await asyncio.to_thread(in_a_thread)
        assert json.loads(got["manifest.json"]) == {"seed": 0}
        with pytest.raises(RuntimeError, match="worker threads"):
            ta.info("runs", "r1")  # on the event loop it would block the loop it waits for
    finally:
        await a.close()
        await b.close()


async def test_the_bucket_is_replicated_on_a_cluster_and_survives_a_node(tmp_path: Path) -> None:
    with EmbeddedCluster(tmp_path / "cluster", size=3) as cluster:
        settings = load_settings(state_dir=tmp_path / "a", nats={"url": cluster.url, "publish_retry_s": 60},
                                 streams={"replicas": 3}, artifacts={"chunk_kib": 16})
        a = await Bus.connect(settings, cluster.url)
        await a.ensure_streams()
        other = load_settings(state_dir=tmp_path / "b", nats={"url": cluster.url}, streams={"replicas": 3})
        b = await Bus.connect(other, cluster.url)
        try:
            folder = make_folder(settings.layout.artifact("adapters", "6" * 64))
            await a.artifacts.publish("adapters", "6" * 64)
            info = await a.js.stream_info(a.artifacts.stream)
            assert info.config.num_replicas == 3
            cluster.nodes[0].kill()
            got = await b.artifacts.local("adapters", "6" * 64)
            assert files_of(got) == published(folder)
        finally:
            await a.close()
            await b.close()


def test_the_store_knows_only_artifact_kinds(tmp_path: Path) -> None:
    store = ArtifactStore(js=None, settings=load_settings(state_dir=tmp_path))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown artifact kind"):
        store.cache_path("vectors", "x")
    with pytest.raises(ValueError, match="letters, digits"):
        store.cache_path("runs", "../escape")


def test_the_artifacts_commands_push_list_and_pull(tmp_path: Path, nats_server: Any,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from flywheel_loop.engine.cli import app

    runner = CliRunner()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLYWHEEL_NATS__URL", nats_server.url)
    monkeypatch.setenv("FLYWHEEL_STATE_DIR", str(tmp_path / "old"))
    dataset = make_folder(tmp_path / "old" / "datasets" / ("7" * 64))
    make_folder(tmp_path / "old" / "adapters" / ("8" * 64), seed=2)
    (tmp_path / "old" / "datasets" / ".tmp-7777-half").mkdir()  # scratch, never an artifact

    pushed = runner.invoke(app, ["artifacts", "push"])
    assert pushed.exit_code == 0, pushed.output
    assert "2 published, 0 already on the bus" in pushed.output
    again = runner.invoke(app, ["artifacts", "push"])
    assert "0 published, 2 already on the bus" in again.output

    listed = runner.invoke(app, ["artifacts", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    names = [a["name"] for a in json.loads(listed.output)]
    assert names == ["adapters/" + "8" * 64, "datasets/" + "7" * 64]

    monkeypatch.setenv("FLYWHEEL_STATE_DIR", str(tmp_path / "new"))
    pulled = runner.invoke(app, ["artifacts", "pull", "datasets", "7" * 64])
    assert pulled.exit_code == 0, pulled.output
    assert files_of(tmp_path / "new" / "datasets" / ("7" * 64)) == published(dataset)
    missing = runner.invoke(app, ["artifacts", "pull", "datasets", "9" * 64])
    assert missing.exit_code == 1 and "neither in" in missing.output
    wrong = runner.invoke(app, ["artifacts", "list", "--kind", "vectors"])
    assert wrong.exit_code == 2 and "one of datasets, adapters, runs, models" in wrong.output
