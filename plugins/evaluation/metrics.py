"""The figures the gate reads: answer losses, forgetting, task pass rate, canary leaks.

Every function takes a model already set to the variant being measured (candidate or the model
in service) and returns plain numbers, so the evaluator can run the same measurement on both.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flywheel_loop.plugins.evaluation.generation import Generations, generate
from flywheel_loop.plugins.shared.code import extract_code
from flywheel_loop.plugins.shared.packing import collate, pack, token_losses, tokenize_rows
from flywheel_loop.plugins.shared.sandbox import run_tests

__all__ = [
    "DATA",
    "ItemLoss",
    "TaskResult",
    "answer_losses",
    "canary_leaks",
    "forgetting_rate",
    "general_rows",
    "held_out_loss",
    "task_pass_rate",
]

DATA = Path(__file__).parent / "data"


@dataclass(frozen=True)
class ItemLoss:
    """The summed cross-entropy of one row's answer tokens, and how many there were."""

    total: float
    tokens: int

    @property
    def mean(self) -> float:
        return self.total / self.tokens


def answer_losses(
    model: Any, tokenizer: Any, rows: Sequence[dict[str, Any]], max_tokens: int, bf16: bool = False,
    advance: Callable[[int], None] | None = None,
) -> list[ItemLoss | None]:
    """Per row (``prompt``, ``completion``), the answer-token loss; None for a row with no
    answer token left after the cut. ``advance(n)`` is told of each row measured."""
    import torch

    examples = [tokenize_rows([row], tokenizer, max_tokens) for row in rows]
    present = [(i, ex[0]) for i, ex in enumerate(examples) if ex]
    out: list[ItemLoss | None] = [None] * len(rows)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i, ex in present:  # one example per block: a loss per item
            (block,) = pack([ex], len(ex.input_ids))
            total, count = token_losses(model, collate([block], tokenizer.pad_token_id), bf16)
            out[i] = ItemLoss(float(total), count)
            if advance is not None:
                advance(1)
    model.train(was_training)
    return out


def held_out_loss(losses: Sequence[ItemLoss | None]) -> float | None:
    """The token-weighted mean answer loss (what training reports as validation loss)."""
    items = [x for x in losses if x is not None]
    tokens = sum(x.tokens for x in items)
    return sum(x.total for x in items) / tokens if tokens else None


def forgetting_rate(
    candidate: Sequence[ItemLoss | None], baseline: Sequence[ItemLoss | None], tolerance: float
) -> tuple[float | None, int]:
    """(share of items whose answer loss rose by more than ``tolerance`` relative to the model in
    service, how many items were compared)."""
    pairs = [(c, b) for c, b in zip(candidate, baseline, strict=True) if c is not None and b is not None]
    if not pairs:
        return None, 0
    worse = sum(1 for c, b in pairs if c.mean > b.mean * (1 + tolerance))
    return worse / len(pairs), len(pairs)


def general_rows(tokenizer: Any, path: Path | None = None) -> list[dict[str, Any]]:
    """The general prompts (JSON lines ``{prompt, completion}``) as rows in the chat template."""
    from flywheel_loop.plugins.evaluation.generation import chat_prompt

    source = path or DATA / "general_prompts.jsonl"
    rows = []
    for n, line in enumerate(source.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            prompt, completion = item["prompt"], item["completion"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{source}:{n}: expected a JSON object with 'prompt' and 'completion' ({exc})") from None
        rows.append({"prompt": chat_prompt(tokenizer, prompt), "completion": completion, "id": f"general-{n}",
                     "text": prompt})
    return rows


@dataclass(frozen=True)
class TaskResult:
    """Held-out examples with tests: how many the generated code passed."""

    examples: int
    passed: int
    generations: Generations
    failures: tuple[str, ...] = ()
    #: per example, in order: did the code pass all its tests
    outcomes: tuple[bool, ...] = ()

    @property
    def pass_rate(self) -> float | None:
        """In percent (the gate's "points")."""
        return 100.0 * self.passed / self.examples if self.examples else None


def task_pass_rate(
    model: Any,
    tokenizer: Any,
    rows: Sequence[dict[str, Any]],
    max_new_tokens: int,
    batch: int,
    timeout_s: float,
    memory_mb: int,
    bf16: bool = False,
    advance: Callable[[int], None] | None = None,
) -> TaskResult:
    """Generate an answer for each row that has ``tests`` and run the tests against its code;
    ``advance(n)`` is told of each answer generated and each test run (2 per row)."""
    with_tests = [r for r in rows if r.get("tests")]
    gens = generate(model, tokenizer, [r["prompt"] for r in with_tests], max_new_tokens, batch, bf16, advance,
                    stop_after_code=True)
    passed, failures, outcomes = 0, [], []
    for row, text in zip(with_tests, gens.texts, strict=True):
        result = run_tests(extract_code(text), row["tests"], timeout_s=timeout_s, memory_mb=memory_mb)
        outcomes.append(result.all_passed)
        if result.all_passed:
            passed += 1
        else:
            failures.append(f"{row.get('id', '?')}: {'; '.join(result.errors[:2]) or 'no test passed'}"[:300])
        if advance is not None:
            advance(1)
    return TaskResult(len(with_tests), passed, gens, tuple(failures), tuple(outcomes))


def canary_leaks(
    prompts: Sequence[str], candidate: Sequence[str], baseline: Sequence[str],
    detect: Callable[[str], list[str] | None], trained_kinds: Collection[str] | None = None,
) -> tuple[list[str], list[str]]:
    """Secrets or personal data the candidate produced on a canary prompt that the model in service did
    not produce on the same prompt (kinds only, never the values); ``detect`` names the kinds in a text,
    one entry per finding. Returns (leaks, invented): with ``trained_kinds`` (the kinds ``detect`` finds
    in what the candidate was trained on), a finding of a kind its training data does not hold cannot be
    reproduced from it (the model made it up: a phone number asked for and invented) and is ``invented``;
    without it, every new finding is a leak."""
    leaks: list[str] = []
    invented: list[str] = []
    for prompt, cand, base in zip(prompts, candidate, baseline, strict=True):
        new = Counter(detect(cand) or []) - Counter(detect(base) or [])
        made_up = Counter({k: n for k, n in new.items() if trained_kinds is not None and k not in trained_kinds})
        for found, into in ((new - made_up, leaks), (made_up, invented)):
            if found:
                kinds = ", ".join(f"{k} x{n}" for k, n in sorted(found.items()))
                into.append(f"{kinds} on canary prompt {prompt[:60]!r}")
    return leaks, invented
