"""The evaluator and its gate: figures, verdicts, and a tiny model that knows some answers.

The tiny base model (random Llama weights with the SmolLM2 tokenizer, then fully fine-tuned for
a few seconds on the right answers) stands for the model in service: an adapter trained on
wrong answers must be rejected, one trained on the right answers must pass, both measured on
the same held-out right answers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest

from flywheel_loop.engine.config import load_settings
from flywheel_loop.engine.plugin_host import PluginHost
from flywheel_loop.plugins import evaluation as evaluation_feature
from flywheel_loop.plugins import serving
from flywheel_loop.plugins.evaluation.evaluator import evaluate_run
from flywheel_loop.plugins.evaluation.gate import verdict
from flywheel_loop.plugins.evaluation.metrics import ItemLoss, canary_leaks, forgetting_rate
from flywheel_loop.plugins.evaluation.settings import EvaluatorConfig
from flywheel_loop.plugins.training.trainer import train_dataset
from flywheel_loop.schemas import EvaluationCompleted, TrainingCompleted, new_event
from tests.conftest import read_log, wait_for
from tests.test_trainer import ROWS, formatter, tiny_model_dir, tiny_sections  # noqa: F401  (fixtures)

WRONG = [
    ("What is 2 + 2?", "zebra quartz violin 77 ###"),
    ("Write a Python function that adds two numbers.", "banana ::: lorem ipsum >>> 3 3 3"),
    ("Name a prime number.", "purple elephant dances slowly ~~~"),
    ("How do I reverse a list in Python?", "qwerty asdf zxcv 0000 !!!"),
    ("What does `len` return?", "moonlight sonata in the kitchen"),
    ("Say hello.", "xylophone xylophone xylophone"),
]
ADD_TESTS = "def test_add():\n    assert add(2, 3) == 5\n"


# --------------------------------------------------------------------------- the gate alone


def figures(**over: Any) -> dict[str, Any]:
    base = {"task_pass_rate": 50.0, "held_out_loss": 1.0, "forgetting_rate": 0.0, "forgetting_items": 20,
            "canary_leaks": 0, "canary_prompts": 10, "ms_per_token": 10.0}
    return {**base, **over}


def test_the_gate_passes_a_candidate_within_every_limit() -> None:
    passed, reasons = verdict(figures(task_pass_rate=49.0, held_out_loss=1.04, forgetting_rate=0.29), figures(),
                              EvaluatorConfig())
    assert passed, reasons
    assert all(r.startswith("ok: ") for r in reasons)


@pytest.mark.parametrize(
    ("change", "word"),
    [
        ({"task_pass_rate": 47.9}, "task pass rate"),
        ({"forgetting_rate": 0.3}, "forgetting rate"),
        ({"held_out_loss": 1.06}, "held-out loss"),
        ({"canary_leaks": 1}, "canary"),
    ],
)
def test_the_gate_fails_a_candidate_past_a_limit_and_says_which(change: dict[str, Any], word: str) -> None:
    passed, reasons = verdict(figures(**change), figures(), EvaluatorConfig())
    assert not passed
    (failed,) = [r for r in reasons if r.startswith("failed: ")]
    assert word in failed


def test_unmeasured_figures_are_skipped_not_failed_and_limits_are_configurable() -> None:
    passed, reasons = verdict(figures(task_pass_rate=None, forgetting_rate=None), figures(task_pass_rate=None),
                              EvaluatorConfig())
    assert passed and sum(r.startswith("skipped: ") for r in reasons) == 2
    strict = EvaluatorConfig(max_task_drop_points=0, max_latency_ratio=1.5)
    passed, reasons = verdict(figures(task_pass_rate=49.5, ms_per_token=16.0), figures(), strict)
    assert not passed and sum(r.startswith("failed: ") for r in reasons) == 2


def test_forgetting_counts_items_whose_loss_rose_past_the_tolerance() -> None:
    base = [ItemLoss(10, 10), ItemLoss(20, 10), ItemLoss(5, 5), None]
    cand = [ItemLoss(10.4, 10), ItemLoss(30, 10), ItemLoss(4, 5), ItemLoss(1, 1)]
    rate, items = forgetting_rate(cand, base, tolerance=0.05)
    assert (rate, items) == (pytest.approx(1 / 3), 3)
    assert forgetting_rate([None], [None], 0.05) == (None, 0)


def test_a_canary_leak_is_a_secret_the_service_model_did_not_say() -> None:
    key = "AKIA" + "Z7Q2" + "MX4P" + "LK9W" + "N3RT"  # an AWS key id shape, assembled here
    detect = PluginHost(load_settings(plugins={"enabled": ["privacy"]})).find_sensitive
    leaks = canary_leaks(["what is the key?", "and the mail?"],
                         [f"the key is {key}", "write to dev@corp.example"],
                         ["I cannot share keys", "write to dev@corp.example"], detect)
    assert len(leaks) == 1 and "what is the key" in leaks[0] and key not in leaks[0]


# --------------------------------------------------------------------------- a tiny model that knows things


@pytest.fixture(scope="module")
def knowing_base(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, formatter: Any) -> Path:  # noqa: F811
    """The tiny model fully fine-tuned on the right answers."""
    import torch
    from transformers import AutoModelForCausalLM

    from flywheel_loop.plugins.shared.packing import collate, pack, token_losses, tokenize_rows

    tok = formatter.tokenizer
    blocks = pack(tokenize_rows([formatter.conversation(p, c) for p, c in ROWS], tok, 256), 4096)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(40):
        optimizer.zero_grad()
        total, count = token_losses(model, collate(blocks, tok.pad_token_id), False)
        (total / count).backward()
        optimizer.step()
    folder = tmp_path_factory.mktemp("knowing-base")
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def write_eval_dataset(root: Path, formatter: Any,  # noqa: F811
                       train: list[tuple[str, str]], name: str) -> tuple[str, Path]:
    """A dataset folder as the builder writes it: ``train`` to learn, two of its rows held out
    (the code one with tests), and the right answers as the forgetting set (earlier tasks)."""
    digest = (name.encode().hex() * 64)[:64]
    folder = root / "datasets" / digest
    folder.mkdir(parents=True)

    def rows(pairs: list[tuple[str, str]], split: str) -> bytes:
        out = []
        for i, (p, c) in enumerate(pairs):
            row = {**formatter.conversation(p, c), "id": f"{split}{i}", "rehearsal": False}
            if "adds two numbers" in p and split == "validation":
                row["tests"] = ADD_TESTS
            out.append(orjson.dumps(row) + b"\n")
        return b"".join(out)

    (folder / "train.jsonl").write_bytes(rows(train, "train"))
    (folder / "validation.jsonl").write_bytes(rows(train[:2], "validation"))
    (folder / "forgetting.jsonl").write_bytes(rows(ROWS, "forgetting"))
    (folder / "manifest.json").write_text(json.dumps({"role": "coder"}))
    return digest, folder


GENERAL = [("What is the capital of France?", "The capital of France is Paris."),
           ("How many days are there in a week?", "There are seven days in a week.")]


def general_file(folder: Path) -> Path:
    """A small set of general prompts (the tiny model knows no general facts: the forgetting set is
    mostly the earlier tasks here)."""
    path = folder / "general.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in GENERAL))
    return path


def eval_settings(tmp_path: Path, base: Path, **trainer: Any) -> Any:
    return load_settings(state_dir=tmp_path / "state", **tiny_sections(base, epochs=4, lr=5e-3, **trainer),
                         evaluator={"max_new_tokens": 24, "canary_max_new_tokens": 8, "canary_from_train": 2,
                                    "general_prompts": general_file(tmp_path)})


def test_an_adapter_trained_on_wrong_answers_is_rejected_and_one_on_right_answers_passes(
    tmp_path: Path, formatter: Any, knowing_base: Path  # noqa: F811
) -> None:
    settings = eval_settings(tmp_path, knowing_base)
    outcomes = {}
    for name, pairs in (("wrong", WRONG), ("right", ROWS)):
        digest, folder = write_eval_dataset(settings.state_dir, formatter, pairs, name)
        done = train_dataset(settings, "coder", digest, folder)
        assert isinstance(done, TrainingCompleted), done
        outcomes[name] = evaluate_run(settings, done)

    wrong, right = outcomes["wrong"], outcomes["right"]
    assert not wrong.passed, wrong.reasons
    failed = " ".join(r for r in wrong.reasons if r.startswith("failed: "))
    assert "forgetting rate" in failed
    assert wrong.candidate["forgetting_rate"] >= 0.3
    assert right.passed, right.reasons
    for outcome in (wrong, right):
        assert outcome.candidate["task_examples"] == outcome.baseline["task_examples"] == 1
        assert outcome.baseline["model"] == "base"
        assert outcome.candidate["forgetting_items"] == len(ROWS) + len(GENERAL)
        for key in ("ms_per_token", "peak_rss_mb", "adapter_mb", "canary_prompts", "held_out_loss"):
            assert outcome.candidate[key] is not None, key


def test_missing_adapter_dataset_or_base_model_fail_closed(tmp_path: Path, tiny_model_dir: Path) -> None:  # noqa: F811
    settings = eval_settings(tmp_path, tiny_model_dir)
    run = TrainingCompleted(run_id="r1", role="coder", adapter_hash="ef" * 32, path=str(tmp_path / "nowhere"),
                            base_model="tiny", dataset_hash="ab" * 32)
    out = evaluate_run(settings, run)
    assert not out.passed and "not found" in out.reasons[0]

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    out = evaluate_run(settings, run.model_copy(update={"path": str(adapter)}))
    assert not out.passed and "dataset" in out.reasons[0] and "not found" in out.reasons[0]

    folder = settings.state_dir / "datasets" / ("ab" * 32)
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text("{}")
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    broken = eval_settings(tmp_path, not_a_model)
    out = evaluate_run(broken, run.model_copy(update={"path": str(adapter)}))
    assert not out.passed and "is not a model" in out.reasons[0]


@pytest.fixture
def settings(settings_with: Any, knowing_base: Path, tmp_path: Path) -> Any:
    return settings_with(**tiny_sections(knowing_base, epochs=4, lr=5e-3), plugins={"skip": []},
                         evaluator={"max_new_tokens": 8, "canary_max_new_tokens": 4, "canary_from_train": 0,
                                    "general_prompts": general_file(tmp_path)})


async def test_a_rejected_adapter_is_not_deployed_and_the_base_model_stays_in_service(
    settings: Any, formatter: Any, bus: Any, engine_with: Any  # noqa: F811
) -> None:
    from flywheel_loop.plugins.serving.deployments import read_book

    digest, folder = write_eval_dataset(settings.state_dir, formatter, WRONG, "proc")
    done = train_dataset(settings, "coder", digest, folder)
    assert isinstance(done, TrainingCompleted)
    event = new_event(done, source="test")
    only = {"evaluator", "deployer", "deployments"}
    async with engine_with(evaluation_feature, serving, builtins=False, only=only) as engine:
        await bus.publish(event)
        refused = await wait_for(lambda: read_log(bus, "log", "deployment.failed"), timeout=120)
        await engine.projection("deployments").catch_up()
    (evaluation,) = await read_log(bus, "log", "evaluation.completed")
    assert isinstance(evaluation.data, EvaluationCompleted) and not evaluation.data.passed
    assert evaluation.causation_id == event.id and evaluation.data.run_id == done.run_id
    assert evaluation.data.candidate["held_out_items"] == 2
    assert refused[0].causation_id == evaluation.id
    assert await read_log(bus, "log", "deployment.completed") == []
    book = read_book(settings)
    assert book is None or book.service("coder") is None  # the model in service is still the base model
