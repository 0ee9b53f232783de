"""The models the demo's agent asks: the base model in this process, or the deployed version over HTTP.

Both answer a list of prompts with greedy decoding through the base model's chat template, so
the same prompt gets the same answer, and a before/after difference is the adapter's doing:

- ``LocalModel`` loads the base model (a Hugging Face folder) with transformers and answers in
  batches (left padding); a sequence stops at the end-of-text token or once it has closed a
  fenced code block, since what follows the code is prose the tests never see.
- ``ServedModel`` asks a version the deployer put in service: ``POST <endpoint>/chat/completions``
  (OpenAI-compatible), one prompt at a time, with the ``model`` name from ``deployment.completed``.
"""

from __future__ import annotations

import importlib
import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from flywheel_loop.plugins.shared.openai_client import post_chat
from flywheel_loop.plugins.shared.stopping import closed_fence

__all__ = ["Answer", "Answerer", "LocalModel", "ModelUnreachable", "ServedModel"]


class ModelUnreachable(RuntimeError):
    """The deployed model's endpoint did not answer; the message names it."""


@dataclass(frozen=True)
class Answer:
    """One answer and what it cost."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    duration_ms: float


class Answerer(Protocol):
    """Something that answers coding prompts under a model name."""

    name: str

    def answer_many(self, prompts: list[str]) -> list[Answer]:
        """One greedy answer per prompt, in order."""


class LocalModel:
    """The base model, loaded in this process with transformers."""

    def __init__(self, folder: Path, name: str, max_new_tokens: int = 160, batch: int = 32) -> None:
        # imported by name: the trainer's module is a plugin, outside the engine's type-checked packages
        models = importlib.import_module("flywheel_loop.plugins.shared.models")
        load_base = models.load_base
        self._threads = models.torch_threads  # the process's default count, not what this worker thread inherited
        self.name = name
        self.max_new_tokens = max_new_tokens
        self.batch = batch
        self.model, self.tokenizer = load_base(folder)
        self.model.eval()
        self.tokenizer.padding_side = "left"

    def answer_many(self, prompts: list[str]) -> list[Answer]:
        import torch

        from flywheel_loop.plugins.shared.inference import GrowingCache

        answers: list[Answer] = []
        for i in range(0, len(prompts), self.batch):
            chunk = prompts[i : i + self.batch]
            texts = [
                self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
                )
                for p in chunk
            ]
            enc = self.tokenizer(texts, return_tensors="pt", padding=True)
            start = enc["input_ids"].shape[1]
            began = time.monotonic()
            with torch.no_grad(), self._threads(None):
                out = self.model.generate(
                    **enc,
                    max_new_tokens=self.max_new_tokens,
                    do_sample=False,
                    pad_token_id=self.tokenizer.pad_token_id,
                    stopping_criteria=closed_fence(self.tokenizer, start), cache=GrowingCache(),
                )
            elapsed = (time.monotonic() - began) * 1000 / len(chunk)
            for row, mask in zip(out, enc["attention_mask"], strict=True):
                new = row[start:]
                completion = int((new != self.tokenizer.pad_token_id).sum())
                text = self.tokenizer.decode(new, skip_special_tokens=True)
                answers.append(Answer(text.strip(), int(mask.sum()), completion, elapsed))
        return answers


class ServedModel:
    """A version in service, asked through its OpenAI-compatible endpoint."""

    def __init__(self, endpoint: str, name: str, max_new_tokens: int = 160, timeout_s: float = 300.0) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.name = name
        self.max_new_tokens = max_new_tokens
        self.timeout_s = timeout_s

    def answer_many(self, prompts: list[str]) -> list[Answer]:
        return [self._ask(p) for p in prompts]

    def _ask(self, prompt: str) -> Answer:
        began = time.monotonic()
        try:
            reply = post_chat(self.endpoint, self.name, prompt, self.max_new_tokens, 0.0, self.timeout_s)
        except (urllib.error.URLError, TimeoutError, json.JSONDecodeError) as exc:
            raise ModelUnreachable(
                f"the deployed model {self.name} at {self.endpoint} did not answer: {exc}"
            ) from exc
        usage = reply.get("usage") or {}
        return Answer(
            text=str(reply["choices"][0]["message"]["content"]).strip(),
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
            duration_ms=(time.monotonic() - began) * 1000,
        )
