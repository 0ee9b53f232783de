"""The Ollama runtime (``deployer.runtime = "ollama"``): each version becomes an Ollama model built FROM the base
model with the version's adapter, created through Ollama's HTTP API (``ollama.url``).

``prepare`` does what ``ollama create -f Modelfile`` does, over HTTP:

1. the base: ``ollama.base`` (an Ollama model, e.g. ``qwen2.5-coder:1.5b``) when configured; otherwise the
   trainer's base model is uploaded once and created as ``flywheel-base-<key>`` (the bundled SmolLM2 as its
   GGUF, or a Hugging Face folder's config, tokenizer and safetensors);
2. the adapter: Ollama takes a PEFT safetensors adapter only for the llama and gemma2 architectures, so for
   those ``adapter_model.safetensors`` and ``adapter_config.json`` are uploaded as they are, and for any other
   (Qwen2, ...) the adapter is converted to a GGUF LoRA first (llama.cpp's ``convert_lora_to_gguf.py``, as the
   llama.cpp runtime does);
3. each file is uploaded as a blob named by its SHA-256 (``HEAD /api/blobs/sha256:<hex>``, then ``POST`` when
   Ollama lacks it), and ``POST /api/create`` makes the version with ``from``, ``adapters`` and ``parameters``
   (``temperature``, ``top_p``, ``top_k`` from ``[ollama]``). The equivalent Modelfile is written to
   ``<state_dir>/runtimes/ollama/<model name>/Modelfile`` for ``ollama create -f`` by hand.

``serve`` loads the model and returns Ollama's OpenAI-compatible URL (``<ollama.url>/v1``); ``generate`` is one
``/api/chat``; ``stop`` unloads the model (``keep_alive: 0``); ``retire`` deletes it (versions beyond
``deployer.keep_versions``, or one that failed its smoke test). Ollama not running is a ``RuntimeUnavailable``
that says so before anything is uploaded or created.
"""

from __future__ import annotations

import hashlib
import json
import logging
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from flywheel_loop.engine.extensions import RuntimeUnavailable, ServedModel
from flywheel_loop.plugins.serving.settings import OllamaConfig

__all__ = ["SAFETENSORS_ADAPTER_ARCHITECTURES", "OllamaRuntime"]

log = logging.getLogger(__name__)

#: the architectures whose PEFT safetensors adapters Ollama imports as they are (others go as GGUF)
SAFETENSORS_ADAPTER_ARCHITECTURES = frozenset({"llama", "gemma2"})
#: the files of a Hugging Face folder Ollama needs to import it as a base model
BASE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _architecture(base_dir: Path) -> str:
    try:
        return str(json.loads((base_dir / "config.json").read_text())["model_type"])
    except (OSError, ValueError, KeyError) as exc:
        raise RuntimeUnavailable(f"cannot tell the architecture of the base model {base_dir}: {exc}") from exc


class OllamaRuntime:
    """Serves versions as Ollama models; see the module docstring."""

    name = "ollama"

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.config = OllamaConfig.of(settings)
        self.url: str = str(self.config.url).rstrip("/")
        self.root = Path(settings.state_dir) / "runtimes" / "ollama"

    # ------------------------------------------------------------------ HTTP

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None, data: Path | None = None,
              timeout: float | None = None) -> tuple[int, dict[str, Any]]:
        """(status, JSON answer) of one API call; ``RuntimeUnavailable`` when Ollama cannot be reached."""
        headers = {}
        payload: Any = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        file = None
        try:
            if data is not None:  # streamed from disk: weights can be gigabytes
                file = data.open("rb")
                payload = file
                headers["Content-Length"] = str(data.stat().st_size)
                headers["Content-Type"] = "application/octet-stream"
            # urlopen(request, data=...) would drop the Content-Length set here: the data goes in the Request
            request = urllib.request.Request(f"{self.url}{path}", data=payload, method=method, headers=headers)
            with urllib.request.urlopen(request, timeout=timeout or self.config.timeout_s) as response:
                raw = response.read()
                status = response.status
        except urllib.error.HTTPError as exc:
            raw, status = exc.read(), exc.code
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise RuntimeUnavailable(
                f"Ollama is not running at {self.url} ({reason}): start it with `ollama serve`, set ollama.url to"
                ' where it listens, or use deployer.runtime = "transformers"'
            ) from exc
        finally:
            if file is not None:
                file.close()
        try:
            answer = json.loads(raw) if raw.strip() else {}
        except ValueError:
            answer = {"error": raw.decode(errors="replace")[:500]}
        if not isinstance(answer, dict):
            answer = {"value": answer}
        return status, answer

    def _ok(self, what: str, status: int, answer: dict[str, Any]) -> dict[str, Any]:
        if status >= 400 or "error" in answer:
            raise RuntimeUnavailable(f"Ollama at {self.url} refused to {what}: {answer.get('error', status)}")
        return answer

    def check(self) -> str:
        """Ollama's version; ``RuntimeUnavailable`` when it is not running."""
        status, answer = self._call("GET", "/api/version", timeout=10)
        return str(self._ok("say its version", status, answer).get("version", "unknown"))

    def upload(self, path: Path) -> str:
        """Upload ``path`` as a blob unless Ollama has it; return its digest (``sha256:<hex>``)."""
        digest = f"sha256:{_sha256(path)}"
        status, _ = self._call("HEAD", f"/api/blobs/{digest}")
        if status != 200:
            status, answer = self._call("POST", f"/api/blobs/{digest}", data=path)
            self._ok(f"store {path.name} ({digest})", status, answer)
        return digest

    def exists(self, name: str) -> bool:
        status, _ = self._call("POST", "/api/show", {"model": name}, timeout=30)
        return status == 200

    # ------------------------------------------------------------------ what a version is made of

    def base_files(self, model: ServedModel) -> dict[str, Path]:
        """The files the base model is created from (when ``ollama.base`` is not set)."""
        if self.settings.models.base is None:
            from flywheel_loop.plugins.shared.chat_format import bundled_base_model

            gguf = bundled_base_model()
            if gguf is not None:
                return {gguf.name: gguf}
        base = model.base_model_dir
        files = {name: base / name for name in BASE_FILES if (base / name).is_file()}
        weights = sorted(base.glob("*.safetensors"))
        if not weights or "config.json" not in files:
            raise RuntimeUnavailable(
                f"base model {base} has no config.json and safetensors weights Ollama can import: set ollama.base to"
                " an Ollama model built from the same weights"
            )
        files.update({p.name: p for p in weights})
        return files

    def adapter_files(self, model: ServedModel) -> dict[str, Path]:
        """The adapter's files as Ollama takes them: PEFT safetensors (llama, gemma2) or a GGUF LoRA."""
        if model.adapter_dir is None:
            return {}
        folder = model.adapter_dir
        from flywheel_loop.plugins.serving.runtimes.gguf import refuse_router

        refuse_router(folder, "ollama")
        if _architecture(model.base_model_dir) in SAFETENSORS_ADAPTER_ARCHITECTURES:
            files = {n: folder / n for n in ("adapter_model.safetensors", "adapter_config.json")}
            missing = [n for n, p in files.items() if not p.is_file()]
            if missing:
                raise RuntimeUnavailable(f"adapter {folder} lacks {missing}: it is not a PEFT safetensors adapter")
            return files
        from flywheel_loop.plugins.serving.runtimes.gguf import convert_adapter, scripts_dir

        llama_cpp = getattr(self.settings, "llama_cpp", None)
        outtype = str(getattr(llama_cpp, "lora_outtype", "f16"))
        gguf = convert_adapter(
            folder, model.base_model_dir, model.adapter_hash or folder.name, self.root / "adapters", outtype,
            scripts_dir(getattr(llama_cpp, "scripts_dir", None)),
        )
        return {"adapter.gguf": gguf}

    def parameters(self) -> dict[str, Any]:
        return {"temperature": self.config.temperature, "top_p": self.config.top_p, "top_k": self.config.top_k}

    def modelfile(self, base: str, adapters: dict[str, Path]) -> str:
        """The Modelfile equivalent of the create request (for ``ollama create -f`` by hand)."""
        lines = [f"FROM {base}"]
        adapter = next((p for n, p in adapters.items() if n.endswith((".gguf", ".safetensors"))), None)
        if adapter is not None:
            lines.append(f"ADAPTER {adapter.parent if adapter.suffix == '.safetensors' else adapter}")
        lines += [f"PARAMETER {k} {v}" for k, v in self.parameters().items()]
        return "\n".join(lines) + "\n"

    def _base(self, model: ServedModel) -> str:
        """The Ollama model to build FROM: ``ollama.base``, or the trainer's base created once."""
        if self.config.base:
            return str(self.config.base)
        files = self.base_files(model)
        key = hashlib.sha256("|".join(f"{n}:{p.stat().st_size}:{p.stat().st_mtime_ns}:{p.resolve()}"
                                      for n, p in sorted(files.items())).encode()).hexdigest()[:12]
        name = f"flywheel-base-{key}"
        if not self.exists(name):
            digests = {n: self.upload(p) for n, p in files.items()}
            status, answer = self._call("POST", "/api/create", {"model": name, "files": digests, "stream": False})
            self._ok(f"create the base model {name}", status, answer)
        return name

    # ------------------------------------------------------------------ Runtime protocol

    def prepare(self, model: ServedModel) -> None:
        """Create the version in Ollama (upload what it lacks); raises before anything when Ollama is down."""
        self.check()
        base = self._base(model)
        adapters = self.adapter_files(model)
        body: dict[str, Any] = {
            "model": model.model_name,
            "from": base,
            "parameters": self.parameters(),
            "stream": False,
        }
        if adapters:
            body["adapters"] = {n: self.upload(p) for n, p in adapters.items()}
        status, answer = self._call("POST", "/api/create", body)
        self._ok(f"create {model.model_name}", status, answer)
        folder = self.root / model.model_name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "Modelfile").write_text(self.modelfile(base, adapters))

    def serve(self, model: ServedModel, port: int = 0) -> str:
        """Load the version (Ollama answers for it from now on); return Ollama's OpenAI-compatible URL.
        ``port`` is ignored: Ollama serves every model on its own port."""
        status, answer = self._call("POST", "/api/generate", {"model": model.model_name, "stream": False})
        self._ok(f"load {model.model_name}", status, answer)
        return f"{self.url}/v1"

    def generate(self, model: ServedModel, prompt: str, max_tokens: int = 64, temperature: float = 0.0) -> str:
        body = {
            "model": model.model_name,
            "messages": [{"role": "user", "content": prompt}],
            "stream": False,
            "options": {"temperature": temperature, "num_predict": max_tokens},
        }
        status, answer = self._call("POST", "/api/chat", body)
        answer = self._ok(f"answer with {model.model_name}", status, answer)
        try:
            return str(answer["message"]["content"])
        except (KeyError, TypeError) as exc:
            raise RuntimeUnavailable(f"Ollama's answer for {model.model_name} has no message: {answer}") from exc

    def stop(self, model: ServedModel) -> None:
        """Unload the version from memory (it stays created; idempotent, quiet when Ollama is gone)."""
        try:
            self._call("POST", "/api/generate", {"model": model.model_name, "keep_alive": 0, "stream": False},
                       timeout=30)
        except RuntimeUnavailable:
            pass

    def retire(self, model: ServedModel) -> None:
        """Delete the version from Ollama (no longer kept, or never took traffic)."""
        status, answer = self._call("DELETE", "/api/delete", {"model": model.model_name}, timeout=60)
        if status not in (200, 404):
            self._ok(f"delete {model.model_name}", status, answer)
        modelfile = self.root / model.model_name / "Modelfile"
        modelfile.unlink(missing_ok=True)
        try:
            modelfile.parent.rmdir()
        except OSError:
            pass
