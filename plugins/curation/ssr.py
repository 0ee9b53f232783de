"""Self-synthesized rehearsal (SSR): the base model's own answers to general prompts, as rehearsal rows.

A role's first dataset has no past to rehearse, so the dataset builder asks the
``synthesize_rehearsal`` hook for the rows it misses. This plugin answers it (``[ssr] enabled``):

1. **prompts**: general prompts (``ssr_prompts.txt`` beside this module, or ``ssr.prompts_file``),
   in an order seeded by ``ssr.seed``; the first ``pool`` of them are answered (a pool larger than
   the rows wanted, so there is something to choose from);
2. **answers**: the base model (``models.base``; the same one the trainer tunes) answers each one
   greedily, in fixed batches, up to ``max_new_tokens``, at the precision the other model work of this
   machine uses (``models.precision``: bf16 autocast only where the CPU runs it natively and it measured
   faster). The answers are cached under ``<state_dir>/cache/ssr/<key>.jsonl`` (the key: the model, the
   prompts, the generation settings and the precision), so a rebuild or a replay reads the same bytes and
   does not generate again;
3. **checks**: an answer is kept only when it finished (ended with the end-of-turn token, not cut by the
   token limit), has at least ``min_chars`` characters, is printable text, does not repeat itself
   (distinct word 3-grams at least ``min_distinct_trigrams`` of all, no line three times), is not the
   prompt echoed back, and, for a prompt with tests (``ssr_tests.jsonl`` beside this module, or
   ``ssr.tests_file``), when its code passes them in the sandbox: the base model's wrong answer to a
   coding prompt would be rehearsed as if it were right (of SmolLM2-135M's greedy answers to the 27 coding
   prompts in the demo's pool of 64, 11 fail their tests). Each refusal is counted by reason in the log;
4. **diversity**: among the kept answers, ``wanted`` are chosen with the builder's own k-means selection
   (``rehearsal.select_diverse``) over hashed word and word-pair counts of prompt and answer.

The rows carry ``domain = "general"``; the builder formats them with the chat template and tags
them ``rehearsal`` and ``synthetic`` (``source = "synthetic"``). Everything is a function of the
settings, the model and the prompts: the same build gets the same rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from flywheel_loop.engine.config import PluginSection, Settings
from flywheel_loop.plugins.curation.rehearsal import select_diverse
from flywheel_loop.plugins.shared.stopping import closed_fence, through_code

__all__ = ["Candidate", "SsrConfig", "check", "failed_tests", "features", "load_prompts", "load_tests",
           "self_synthesize"]

log = logging.getLogger(__name__)

PROMPTS_FILE = Path(__file__).with_name("ssr_prompts.txt")
TESTS_FILE = Path(__file__).with_name("ssr_tests.jsonl")
#: bumped when what is generated or how changes: old cache files are then not read
CACHE_VERSION = 1


class SsrError(ValueError):
    """The SSR prompts cannot be used; the message says why."""


class SsrConfig(PluginSection):
    """Self-synthesized rehearsal (``plugins/curation/ssr.py``): the base model's answers to general
    prompts fill the rehearsal share a dataset's past cannot (a role's first dataset)."""

    section_name: ClassVar[str] = "ssr"

    enabled: bool = Field(default=False, description="answer the builder's synthesize_rehearsal hook")
    prompts_file: Path | None = Field(default=None, description="one prompt a line; none = the bundled prompts")
    pool: int | None = Field(
        default=None, ge=1, description="prompts answered per build; none = 3 x the rows wanted, at least 12"
    )
    max_new_tokens: int = Field(default=96, ge=8, le=2048, description="tokens per answer")
    batch: int = Field(default=32, ge=1, le=256, description="prompts per generation batch (larger is faster on a CPU:"
                       " the rows of a batch share each token's read of the weights)")
    min_chars: int = Field(default=20, ge=1, description="shorter answers are refused")
    min_distinct_trigrams: float = Field(
        default=0.6, ge=0, le=1, description="distinct word 3-grams over all of them below this: repetitive, refused"
    )
    require_finished: bool = Field(
        default=True, description="refuse an answer the token limit cut (it did not end its turn)"
    )
    tests_file: Path | None = Field(
        default=None, description="JSON lines {prompt, tests}: the answer to such a prompt is kept only when its code"
        " passes the tests (a test function, as the sandbox runs it); none = the bundled ssr_tests.jsonl",
    )
    verify_code: bool = Field(default=True, description="run the tests of tests_file; false = keep untested answers")
    test_timeout_s: float = Field(default=10.0, gt=0, description="seconds an answer's tests may run")
    stop_after_code: bool = Field(
        default=True, description="an answer ends once it has closed a code block and counts as finished (the"
        " code is what a coding model rehearses; the prose after it costs most of the tokens)",
    )
    threads: int | None = Field(default=None, ge=1, description="torch threads while generating; none = all")
    seed: int = Field(default=0, description="seeds the prompt order and the diversity selection")


@dataclass(frozen=True)
class Candidate:
    """One generated answer and whether it ended its turn."""

    prompt: str
    answer: str
    finished: bool


def load_prompts(path: Path | None = None) -> list[str]:
    """The prompts of ``path`` (the bundled ones by default): one a line, blank lines and ``#`` lines skipped,
    each once."""
    path = path or PROMPTS_FILE
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise SsrError(f"cannot read the SSR prompts {path}: {exc}") from exc
    prompts = list(dict.fromkeys(s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")))
    if not prompts:
        raise SsrError(f"the SSR prompts file {path} has no prompt")
    return prompts


def load_tests(path: Path | None = None) -> dict[str, str]:
    """The tests of ``path`` (the bundled ones by default) by prompt: JSON lines ``{"prompt", "tests"}``."""
    path = path or TESTS_FILE
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise SsrError(f"cannot read the SSR tests {path}: {exc}") from exc
    tests: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise SsrError(f"{path}:{number}: not JSON ({exc})") from None
        if not (isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("tests"), str)
                and row["prompt"].strip() and row["tests"].strip()):
            raise SsrError(f'{path}:{number}: a line needs non-empty "prompt" and "tests" strings')
        tests[row["prompt"].strip()] = row["tests"]
    return tests


def failed_tests(candidate: Candidate, tests: str, timeout_s: float) -> bool:
    """Whether the code of ``candidate``'s answer fails ``tests`` in the sandbox."""
    from flywheel_loop.plugins.shared.code import extract_code
    from flywheel_loop.plugins.shared.sandbox import run_tests

    return not run_tests(extract_code(candidate.answer), tests, timeout_s=timeout_s).all_passed


_WORD = re.compile(r"\w+")


def check(candidate: Candidate, cfg: SsrConfig) -> str | None:
    """Why ``candidate`` is not fit to rehearse, or None when it is."""
    text = candidate.answer.strip()
    if len(text) < cfg.min_chars:
        return "too short"
    if cfg.require_finished and not candidate.finished:
        return "unfinished"
    if "\ufffd" in text or sum(ch.isprintable() or ch in "\n\t" for ch in text) < 0.98 * len(text):
        return "not text"
    if text.lower() == candidate.prompt.strip().lower():
        return "echo"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if lines and Counter(lines).most_common(1)[0][1] >= 3:
        return "repetitive"
    words = _WORD.findall(text.lower())
    trigrams = list(zip(words, words[1:], words[2:], strict=False))
    if len(trigrams) >= 10 and len(set(trigrams)) < cfg.min_distinct_trigrams * len(trigrams):
        return "repetitive"
    return None


def features(texts: list[str], dim: int = 512) -> np.ndarray:
    """Hashed counts of words and word pairs, L2-normalised: a cheap, deterministic vector per text."""
    x = np.zeros((len(texts), dim), dtype=np.float32)
    for i, text in enumerate(texts):
        words = _WORD.findall(text.lower())
        for token in words + [f"{a} {b}" for a, b in zip(words, words[1:], strict=False)]:
            x[i, int.from_bytes(hashlib.blake2b(token.encode(), digest_size=4).digest(), "big") % dim] += 1.0
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    normalised: np.ndarray = x / np.maximum(norms, 1e-12)
    return normalised


def _order(prompts: list[str], seed: int) -> list[str]:
    return sorted(prompts, key=lambda p: hashlib.sha256(f"{seed}\x1f{p}".encode()).digest())


def _generate(folder: Path, prompts: list[str], cfg: SsrConfig, bf16: bool) -> list[Candidate]:
    import torch

    from flywheel_loop.plugins.shared.inference import GrowingCache
    from flywheel_loop.plugins.shared.models import load_base, torch_threads

    model, tokenizer = load_base(folder)
    model.eval()
    tokenizer.padding_side = "left"
    eos = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")} - {None}
    out: list[Candidate] = []
    with torch_threads(cfg.threads), torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for i in range(0, len(prompts), cfg.batch):
            chunk = prompts[i : i + cfg.batch]
            texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                   add_generation_prompt=True) for p in chunk]
            enc = tokenizer(texts, return_tensors="pt", padding=True)
            start = enc["input_ids"].shape[1]
            stop = closed_fence(tokenizer, start) if cfg.stop_after_code else None
            generated = model.generate(**enc, max_new_tokens=cfg.max_new_tokens, do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(eos),
                                       stopping_criteria=stop, cache=GrowingCache())
            for prompt, row in zip(chunk, generated, strict=True):
                new = row[start:].tolist()
                finished = any(t in eos for t in new)
                if finished:
                    new = new[: next(k for k, t in enumerate(new) if t in eos)]
                text = tokenizer.decode(new, skip_special_tokens=True).strip()
                code = through_code(text) if cfg.stop_after_code and not finished else None
                if code is not None:
                    text, finished = code, True
                out.append(Candidate(prompt, text, finished))
    return out


def _cached(path: Path, make: Any) -> list[Candidate]:
    if path.is_file():
        return [Candidate(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
    made: list[Candidate] = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text("".join(json.dumps(c.__dict__, sort_keys=True) + "\n" for c in made))
    os.replace(tmp, path)
    return made


def self_synthesize(settings: Settings, wanted: int) -> list[dict[str, Any]]:
    """Up to ``wanted`` rehearsal rows (``prompt``, ``completion``, ``domain``, ``complexity``) that the base
    model wrote and that passed the checks, chosen for diversity; fewer when not enough passed."""
    cfg = SsrConfig.of(settings)
    if wanted <= 0:
        return []
    from flywheel_loop.plugins.shared.models import base_model_dir, base_model_name, use_bf16

    prompts = _order(load_prompts(cfg.prompts_file), cfg.seed)
    pool = prompts[: cfg.pool or max(3 * wanted, 12)]
    folder = base_model_dir(settings)
    bf16 = use_bf16(settings.models.precision, "cpu", settings.state_dir)
    key = hashlib.sha256(json.dumps([CACHE_VERSION, base_model_name(settings), str(folder), pool,
                                     cfg.max_new_tokens, cfg.batch, cfg.stop_after_code, bf16],
                                    sort_keys=True).encode()).hexdigest()[:32]
    candidates = _cached(settings.layout.cache / "ssr" / f"{key}.jsonl",
                         lambda: _generate(folder, pool, cfg, bf16))
    tests = load_tests(cfg.tests_file) if cfg.verify_code else {}
    refused: Counter[str] = Counter()
    kept: list[Candidate] = []
    for candidate in candidates:
        reason = check(candidate, cfg)
        if reason is None and candidate.prompt in tests and failed_tests(candidate, tests[candidate.prompt],
                                                                         cfg.test_timeout_s):
            reason = "failed its tests"
        if reason is None:
            kept.append(candidate)
        else:
            refused[reason] += 1
    picks = select_diverse(features([f"{c.prompt}\n{c.answer}" for c in kept]), wanted, seed=cfg.seed).tolist()
    log.info("ssr: %d of %d answers passed the checks (refused: %s); %d rows chosen for %d wanted",
             len(kept), len(candidates), dict(refused) or "none", len(picks), wanted)
    return [{"prompt": kept[i].prompt, "completion": kept[i].answer, "domain": "general", "complexity": "simple"}
            for i in picks]
