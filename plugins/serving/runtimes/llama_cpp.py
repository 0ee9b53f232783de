"""The llama.cpp runtime: the base model as GGUF plus the adapter as a GGUF LoRA, served by llama-cpp-python
through an OpenAI-compatible endpoint on localhost (``deployer.runtime = "llama_cpp"``).

- ``prepare`` finds or makes the base GGUF (``llama_cpp.base_gguf``; else the bundled SmolLM2 GGUF when the base
  folder is its conversion; else the folder converted with ``convert_hf_to_gguf.py``) and converts the adapter
  with ``convert_lora_to_gguf.py`` into ``<state_dir>/runtimes/llama_cpp/adapters/<adapter hash>/``; of those,
  the ``deployer.keep_versions`` most recently used are kept (never one in service), older ones deleted.
- ``serve`` starts ``llama_cpp_server.py`` (one process per served version) on a free port of ``deployer.host``
  with ``OMP_WAIT_POLICY=passive`` (busy-waiting OpenMP threads on shared cores slow generation to a crawl) and
  waits until ``/v1/models`` answers; a server that exits or does not answer in ``llama_cpp.startup_timeout_s``
  raises ``RuntimeUnavailable`` with its last log lines. Logs: ``<state_dir>/runtimes/llama_cpp/logs``.
- ``generate`` is one ``/v1/chat/completions`` request; ``stop`` ends the server process.

llama-cpp-python comes from the wheel ``bash ops/build-llama-cpp`` builds (ggml's AMX code compiled out: its tile
path crashes on the first token on AMX CPUs when GCC 12 built it) and ``bash ops/setup`` installs.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from flywheel_loop.engine.extensions import RuntimeUnavailable, ServedModel
from flywheel_loop.plugins.serving.runtimes.gguf import (
    convert_adapter,
    convert_base,
    prune_adapters,
    refuse_router,
    scripts_dir,
)
from flywheel_loop.plugins.serving.settings import LlamaCppConfig
from flywheel_loop.plugins.shared.openai_client import post_chat

__all__ = ["LlamaCppRuntime", "llama_cpp_installed"]

log = logging.getLogger(__name__)

SERVER_MODULE = "flywheel_loop.plugins.serving.runtimes.llama_cpp_server"
# Run with -m from the project root: as a script, its own folder (holding this llama_cpp.py) would come first on
# sys.path and shadow the llama_cpp package.
PROJECT_ROOT = Path(__file__).resolve().parents[2]
LOG_TAIL_LINES = 25
NOT_INSTALLED = (
    "llama-cpp-python is not installed in this environment: build its wheel with `bash ops/build-llama-cpp`"
    " (about 15 minutes), then install it with `bash ops/setup`"
)


@dataclass
class _Server:
    key: str
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path
    log_file: IO[bytes]
    adapter_hash: str | None


def llama_cpp_installed() -> bool:
    """Whether ``llama_cpp`` (llama-cpp-python) can be imported here, without importing it (that loads the
    native library)."""
    return importlib.util.find_spec("llama_cpp") is not None


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


class LlamaCppRuntime:
    """Serves versions through llama.cpp; see the module docstring. Thread-safe; ``close`` stops every server."""

    name = "llama_cpp"

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.config = LlamaCppConfig.of(settings)
        deployer = getattr(settings, "deployer", None)
        self.keep_versions: int = int(getattr(deployer, "keep_versions", 3))
        self.host: str = str(getattr(deployer, "host", "127.0.0.1"))
        self.root = Path(settings.state_dir) / "runtimes" / "llama_cpp"
        self._servers: dict[str, _Server] = {}
        self._lock = threading.RLock()

    # --- artefacts -------------------------------------------------------------------------------------------

    @staticmethod
    def _require_llama_cpp() -> None:
        if not llama_cpp_installed():
            raise RuntimeUnavailable(NOT_INSTALLED)

    def base_gguf(self, model: ServedModel) -> Path:
        """The GGUF file the base model is served from (converted once when it has to be)."""
        configured = self.config.base_gguf
        if configured is not None:
            if not Path(configured).is_file():
                raise RuntimeUnavailable(f"llama_cpp.base_gguf {configured} does not exist: point it at a .gguf file")
            return Path(configured)
        base = Path(model.base_model_dir)
        if base.is_file() and base.suffix == ".gguf":
            return base
        if not base.is_dir():
            raise RuntimeUnavailable(f"base model {base} of {model.model_name} is neither a folder nor a .gguf file")
        bundled = self._bundled_gguf_for(base)
        if bundled is not None:
            return bundled
        return convert_base(base, self.root / "base", self.config.base_outtype, scripts_dir(self.config.scripts_dir))

    def _bundled_gguf_for(self, base: Path) -> Path | None:
        """The bundled SmolLM2 GGUF when ``base`` is the Hugging Face folder the trainer converted it to
        (``<some state_dir>/models/<gguf stem>-<key of this GGUF file>``)."""
        from flywheel_loop.plugins.shared.chat_format import bundled_base_model

        gguf = bundled_base_model()
        if gguf is None or not base.name.startswith(f"{gguf.stem}-") or base.parent.name != "models":
            return None
        from flywheel_loop.plugins.shared.models import resolve_base_model

        # The trainer's converter names its folder by the GGUF's key and returns it at once when it exists.
        converted = resolve_base_model(None, base.parent.parent)
        return gguf if converted.resolve() == base.resolve() else None

    @staticmethod
    def _adapter_hash(model: ServedModel) -> str:
        if model.adapter_hash:
            return model.adapter_hash
        assert model.adapter_dir is not None
        weights = Path(model.adapter_dir) / "adapter_model.safetensors"
        if not weights.is_file():
            raise RuntimeUnavailable(f"adapter folder {model.adapter_dir} has no adapter_model.safetensors")
        return hashlib.sha256(weights.read_bytes()).hexdigest()

    def adapter_gguf(self, model: ServedModel) -> Path | None:
        """The adapter as a GGUF LoRA (converted once, keyed by its hash); None for the base model alone."""
        if model.adapter_dir is None:
            return None
        adapter_dir = Path(model.adapter_dir)
        if not adapter_dir.is_dir():
            raise RuntimeUnavailable(f"adapter folder {adapter_dir} of {model.model_name} does not exist")
        refuse_router(adapter_dir, "llama_cpp")
        base = Path(model.base_model_dir)
        if not base.is_dir():
            raise RuntimeUnavailable(
                f"adapter {adapter_dir} needs its base model's Hugging Face folder (config.json), got {base}"
            )
        return convert_adapter(
            adapter_dir,
            base,
            self._adapter_hash(model),
            self.root / "adapters",
            self.config.lora_outtype,
            scripts_dir(self.config.scripts_dir),
        )

    def _prune(self, keep_hash: str | None) -> None:
        with self._lock:
            protect = {s.adapter_hash for s in self._servers.values() if s.adapter_hash}
        if keep_hash:
            protect.add(keep_hash)
        removed = prune_adapters(self.root / "adapters", self.keep_versions, protect)
        if removed:
            log.info("llama_cpp: deleted %d old GGUF adapter(s): %s", len(removed), ", ".join(removed))

    # --- Runtime protocol ------------------------------------------------------------------------------------

    def prepare(self, model: ServedModel) -> None:
        """Convert what ``model`` needs to GGUF; no server is started."""
        self._require_llama_cpp()
        self.base_gguf(model)
        adapter = self.adapter_gguf(model)
        self._prune(adapter.parent.name if adapter is not None else None)

    def serve(self, model: ServedModel, port: int = 0) -> str:
        """Start a server for ``model`` on ``port`` (0 = a free one), or return the running one's URL; the URL
        ends in ``/v1``. A taken port raises ``RuntimeUnavailable``."""
        self._require_llama_cpp()
        key = model.model_name
        base = self.base_gguf(model)
        adapter = self.adapter_gguf(model)
        adapter_hash = adapter.parent.name if adapter is not None else None
        with self._lock:
            running = self._servers.get(key)
            if running is not None and running.process.poll() is None and running.adapter_hash == adapter_hash:
                return running.url
            if running is not None:
                self._stop_server(running)
                del self._servers[key]
            server = self._start(key, base, adapter, adapter_hash, port)
            self._servers[key] = server
        self._prune(adapter_hash)
        return server.url

    def _start(self, key: str, base: Path, adapter: Path | None, adapter_hash: str | None, port: int) -> _Server:
        logs = self.root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
        log_path = logs / f"{safe}.log"
        port_file = self.root / "run" / f"{safe}.port"
        port_file.parent.mkdir(parents=True, exist_ok=True)
        port_file.unlink(missing_ok=True)
        threads = self.config.threads
        command = [
            sys.executable, "-m", SERVER_MODULE,
            "--model", str(base), "--alias", key, "--host", self.host, "--port", str(port),
            "--port-file", str(port_file), "--threads", str(threads), "--n-ctx", str(self.config.n_ctx),
            "--parent-pid", str(os.getpid()),
        ]  # fmt: skip
        if adapter is not None:
            command += ["--lora", str(adapter)]
        if self.config.no_repack:
            command.append("--no-repack")
        env = {**os.environ, "OMP_WAIT_POLICY": "passive", "OMP_NUM_THREADS": str(threads)}
        log_file = open(log_path, "ab")  # noqa: SIM115 - closed in _stop_server
        log_file.write(f"\n--- {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(command)}\n".encode())
        log_file.flush()
        process = subprocess.Popen(
            command, cwd=PROJECT_ROOT, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        server = _Server(key, process, "", log_path, log_file, adapter_hash)
        try:
            server.url = self._wait_ready(server, port_file)
        except BaseException:
            self._stop_server(server)
            raise
        log.info("llama_cpp: serving %s at %s (adapter %s)", key, server.url, adapter_hash or "none")
        return server

    def _wait_ready(self, server: _Server, port_file: Path) -> str:
        deadline = time.monotonic() + self.config.startup_timeout_s
        while time.monotonic() < deadline:
            code = server.process.poll()
            if code is not None:
                raise RuntimeUnavailable(
                    f"the llama.cpp server for {server.key} exited with {code} before answering"
                    f" (log {server.log_path}):\n{_tail(server.log_path)}"
                )
            if port_file.is_file():
                port = port_file.read_text().strip()
                url = f"http://{self.host}:{port}/v1"
                try:
                    with urllib.request.urlopen(f"{url}/models", timeout=5) as response:
                        if response.status == 200:
                            return url
                except (urllib.error.URLError, OSError):
                    pass
            time.sleep(0.2)
        raise RuntimeUnavailable(
            f"the llama.cpp server for {server.key} did not answer within {self.config.startup_timeout_s:.0f} s"
            f" (llama_cpp.startup_timeout_s; log {server.log_path}):\n{_tail(server.log_path)}"
        )

    def url(self, model: ServedModel) -> str | None:
        """The base URL ``model`` is served at, or None when it is not being served."""
        with self._lock:
            server = self._servers.get(model.model_name)
            return server.url if server is not None and server.process.poll() is None else None

    def generate(self, model: ServedModel, prompt: str, max_tokens: int = 64, temperature: float = 0.0) -> str:
        """One chat completion of ``prompt`` from the served ``model``."""
        return str(self.chat(model, prompt, max_tokens, temperature)["choices"][0]["message"]["content"])

    def chat(self, model: ServedModel, prompt: str, max_tokens: int = 64, temperature: float = 0.0) -> dict[str, Any]:
        """The whole ``/v1/chat/completions`` answer (with ``usage``) for one user message."""
        with self._lock:
            server = self._servers.get(model.model_name)
        if server is None or server.process.poll() is not None:
            raise RuntimeUnavailable(f"{model.model_name} is not being served by llama.cpp: call serve() first")
        try:
            return post_chat(server.url, model.model_name, prompt, max_tokens, temperature,
                             self.config.request_timeout_s)
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            raise RuntimeUnavailable(f"llama.cpp server for {model.model_name} answered {exc.code}: {detail}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise RuntimeUnavailable(
                f"llama.cpp server for {model.model_name} did not answer ({exc}); log {server.log_path}:\n"
                f"{_tail(server.log_path)}"
            ) from exc

    def stop(self, model: ServedModel) -> None:
        """Stop serving ``model`` (nothing happens when it is not served)."""
        with self._lock:
            server = self._servers.pop(model.model_name, None)
        if server is not None:
            self._stop_server(server)

    def close(self) -> None:
        """Stop every server this runtime started."""
        with self._lock:
            servers = list(self._servers.values())
            self._servers.clear()
        for server in servers:
            self._stop_server(server)

    @staticmethod
    def _stop_server(server: _Server) -> None:
        if server.process.poll() is None:
            server.process.terminate()
            try:
                server.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.process.kill()
                server.process.wait(timeout=10)
        server.log_file.close()
