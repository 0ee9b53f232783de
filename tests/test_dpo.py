"""DPO on preference pairs (TRL) through the same trainer: the adapter prefers the corrections."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import torch

from flywheel_loop.engine.config import load_settings
from flywheel_loop.plugins.training.trainer import train_dataset
from flywheel_loop.schemas import TrainingCompleted, TrainingFailed
from tests.test_trainer import formatter, tiny_model, tiny_model_dir, tiny_sections  # noqa: F401

PAIRS = [
    ("Say hello.", "Hello! How can I help?", "Go away."),
    ("What is 2 + 2?", "2 + 2 is 4.", "It is 5."),
    ("Name a colour.", "Blue is a colour.", "Seven."),
    ("Add 1 and 1.", "1 + 1 is 2.", "Eleven."),
]


def write_pairs(root: Path, formatter: Any, pairs: list[tuple[str, str, str]]) -> tuple[str, Path]:  # noqa: F811
    digest = "dd" * 32
    folder = root / "datasets" / digest
    folder.mkdir(parents=True)
    rows = [{"prompt": formatter.prompt(q), "chosen": c, "rejected": r} for q, c, r in pairs]
    (folder / "dpo_train.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    (folder / "dpo_validation.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows[:2]))
    (folder / "manifest.json").write_text("{}")
    return digest, folder


def margin(model: Any, formatter: Any, prompt: str, chosen: str, rejected: str) -> float:  # noqa: F811
    """log p(chosen | prompt) - log p(rejected | prompt)."""
    tok = formatter.tokenizer

    def logp(answer: str) -> float:
        p = tok(formatter.prompt(prompt), add_special_tokens=False)["input_ids"]
        a = tok(answer, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p + a])
        with torch.no_grad():
            logits = model(ids).logits[0, len(p) - 1 : -1]
        return float(torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(a)[:, None]).sum())

    return logp(chosen) - logp(rejected)


def test_dpo_makes_the_adapter_prefer_the_corrections(tmp_path: Path, formatter: Any,  # noqa: F811
                                                      tiny_model_dir: Path) -> None:  # noqa: F811
    from peft import PeftModel

    sections = tiny_sections(tiny_model_dir, method="dpo", epochs=3, batch=2, lr=2e-2)
    settings = load_settings(state_dir=tmp_path / "state", **sections)
    digest, folder = write_pairs(settings.state_dir, formatter, PAIRS)
    events: list[Any] = []
    done = train_dataset(settings, "coder", digest, folder, emit=events.append)
    assert isinstance(done, TrainingCompleted), done
    assert done.method == "dpo" and events[0].method == "dpo"
    base = tiny_model(tiny_model_dir).eval()
    tuned = PeftModel.from_pretrained(tiny_model(tiny_model_dir), done.path).eval()
    before = sum(margin(base, formatter, *p) for p in PAIRS)
    after = sum(margin(tuned, formatter, *p) for p in PAIRS)
    assert after > before + 0.5, (before, after)


def test_dpo_without_preference_pairs_fails_clearly(tmp_path: Path, formatter: Any,  # noqa: F811
                                                    tiny_model_dir: Path) -> None:  # noqa: F811
    settings = load_settings(state_dir=tmp_path / "state", **tiny_sections(tiny_model_dir, method="dpo"))
    digest, folder = write_pairs(settings.state_dir, formatter, [])
    out = train_dataset(settings, "coder", digest, folder)
    assert isinstance(out, TrainingFailed) and "no preference pairs" in out.reason


def test_dpo_trains_min_steps_and_early_stopping_waits_for_them(tmp_path: Path, formatter: Any,  # noqa: F811
                                                                 tiny_model_dir: Path) -> None:  # noqa: F811
    # 4 pairs at 2 a step: 2 steps an epoch; validation every step, patience 1, a rate that makes it worse
    eager = dict(method="dpo", epochs=1, batch=2, lr=5.0, eval_every=1, early_stopping_patience=1)
    plain = load_settings(state_dir=tmp_path / "a", **tiny_sections(tiny_model_dir, **eager))
    digest, folder = write_pairs(plain.state_dir, formatter, PAIRS)
    one = train_dataset(plain, "coder", digest, folder)
    assert isinstance(one, TrainingCompleted) and one.steps == 2, one
    floor = load_settings(state_dir=tmp_path / "b", **tiny_sections(tiny_model_dir, min_steps=5, **eager))
    digest, folder = write_pairs(floor.state_dir, formatter, PAIRS)
    five = train_dataset(floor, "coder", digest, folder)
    assert isinstance(five, TrainingCompleted) and five.steps == 5, five  # not rounded up to whole epochs
    capped = load_settings(state_dir=tmp_path / "c", **tiny_sections(tiny_model_dir, min_steps=5, max_steps=3,
                                                                      **eager))
    digest, folder = write_pairs(capped.state_dir, formatter, PAIRS)
    three = train_dataset(capped, "coder", digest, folder)
    assert isinstance(three, TrainingCompleted) and three.steps == 3, three
