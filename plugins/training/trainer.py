"""Built-in processor ``trainer``: ``dataset.built`` in, a LoRA adapter and
``training.started`` / ``training.progressed`` / ``training.completed`` (or ``training.failed``) out.

It trains a LoRA adapter (PEFT; rank, alpha, dropout, target projections, learning rate,
epochs, batch and accumulation from ``trainer`` in the configuration) on the dataset's train
split, with the loss on the answer tokens only and examples packed into blocks that cannot
attend to each other (``plugins/shared/packing.py``), through ``accelerate`` (``loop.py``): on a
GPU when there is one (bf16 where it is supported), on several GPUs with ``trainer.processes``
(``launch.py``). The run lives in ``<state_dir>/runs/<run_id>``; ``run_id`` is derived from the
role, the dataset hash, the base model and the hyper-parameters, so a redelivered
``dataset.built`` (after a crash or a kill) resumes the same run from its last checkpoint, and
one that already finished answers with the same ``training.completed``. The adapter is stored
under ``<state_dir>/adapters/<hash>`` (``plugins/shared/models.py``) with a lineage file naming
the dataset, its lineage, the base model and the hyper-parameters.

**Across machines** (``engine/artifacts.py``): the dataset is fetched from the bus when this
machine does not have it (and verified against its hash), and so is the base model; every
checkpoint is published as the object ``runs/<run_id>`` (in the background; the next one waits
for it), so a run killed here resumes from its last checkpoint on any machine; the adapter is
published as ``adapters/<hash>`` before ``training.completed`` names it, and the finished run
(``completed.json``) last. A checkpoint on the bus newer than the local one replaces it before
the run resumes; one that fails its check is a warning, and the run goes on from what is here
(the same data: only slower).

``training.started`` and ``training.progressed`` (every ``progress_every`` steps, and whenever
``progress_every_s`` seconds of training passed since the last one, so a bar moves on slow steps) are
published while the run goes on; a progress bar with rate and ETA is drawn when stderr is a
terminal. A dataset folder that does not exist, a base model that is not a model, a dataset
with nothing to train on and a run past its wall-clock cap end in ``training.failed`` with the
reason (not retried), as do a dataset the bus does not have and one whose copy fails its hash.

It also consumes ``adapter.superseded``: when the deployer decided to retrain an adapter in service
that was trained on forgotten data (``deployer.on_forgotten = "retrain"``), the trainer trains the
dataset that replaced the superseded one, exactly as it trains a built dataset; the new adapter
then goes through the evaluator's gate like any other.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import hashlib
import json
import logging
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from flywheel_loop.engine.artifacts import ArtifactCorrupt, ArtifactInfo, ThreadArtifacts
from flywheel_loop.engine.config import Settings
from flywheel_loop.engine.processor import ProcessContext
from flywheel_loop.plugins.shared.datasets import DatasetUnusable, dataset_folder, read_split
from flywheel_loop.plugins.shared.models import (
    BaseModelUnusable,
    base_model_dir,
    base_model_name,
    load_base,
    store_adapter,
    torch_threads,
    use_bf16,
)
from flywheel_loop.plugins.shared.packing import pack, tokenize_rows
from flywheel_loop.plugins.shared.routing import Router, RouterUnusable, router_embedder
from flywheel_loop.plugins.training.loop import LoopSettings, Progress, RunResult, WallClockExceeded, train_loop
from flywheel_loop.plugins.training.settings import TrainerConfig, sized
from flywheel_loop.schemas import (
    AdapterSuperseded,
    DatasetBuilt,
    Event,
    Payload,
    TrainingCompleted,
    TrainingFailed,
    TrainingProgressed,
    TrainingStarted,
)

__all__ = ["Emit", "hyperparameters", "run_id_for", "train_dataset", "use_bf16"]

log = logging.getLogger(__name__)

#: called with each live event (started, progressed) while a run goes on
Emit = Callable[[Payload], None]

LOOP_FIELDS = (
    "lr", "epochs", "batch", "grad_accum", "max_steps", "warmup_steps", "checkpoint_every", "seed", "eval_every",
    "evals_per_epoch", "kl_weight", "min_steps",
)


def hyperparameters(cfg: TrainerConfig) -> dict[str, Any]:
    """What shapes the adapter (and so the run id): LoRA, optimisation and data settings."""
    return {
        "r": cfg.r,
        "alpha": cfg.alpha,
        "dropout": cfg.dropout,
        "target_modules": ",".join(cfg.target_modules),
        "lr": cfg.lr,
        "epochs": cfg.epochs,
        "batch": cfg.batch,
        "grad_accum": cfg.grad_accum,
        "max_steps": cfg.max_steps,
        "warmup_steps": cfg.warmup_steps,
        "max_tokens": cfg.max_tokens,
        "block_tokens": cfg.block_tokens,
        "seed": cfg.seed,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "eval_every": cfg.eval_every,
        "evals_per_epoch": cfg.evals_per_epoch,
        "size_defaults": cfg.size_defaults,
        "early_stopping_patience": cfg.early_stopping_patience,
        "method": cfg.method,
        **({"dpo_beta": cfg.dpo_beta} if cfg.method == "dpo" else {}),
        # absent at 0 (earlier run ids stay) and for DPO, whose loop does not use it (its reference is built in)
        **({"kl_weight": cfg.kl_weight} if cfg.kl_weight and cfg.method == "sft" else {}),
        **({"min_steps": cfg.min_steps} if cfg.min_steps else {}),  # absent at 0: earlier run ids stay
        # present when on, the default: runs from before routing (no router) are not reused for it
        **({"route": True} if cfg.route else {}),
    }


def run_id_for(role: str, dataset_hash: str, base_model: str, cfg: TrainerConfig) -> str:
    key = json.dumps([role, dataset_hash, base_model, hyperparameters(cfg)], sort_keys=True)
    return f"{role}-{dataset_hash[:16]}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


@contextlib.contextmanager
def _run_lock(runs_dir: Path, run_id: str) -> Iterator[None]:
    """One process per run on a state folder: a second one (another engine on the same folder) raises, so its
    worker retries later instead of training the same run twice. The lock file sits beside the run's folder,
    which a newer checkpoint from the bus may replace."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    with open(runs_dir / f".{run_id}.lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"run {run_id} is being trained by another process") from None
        yield


def _local_step(run_dir: Path) -> float:
    """How far the run in ``run_dir`` got: its last checkpoint's step (infinite once it completed)."""
    if (run_dir / "completed.json").is_file():
        return math.inf
    steps = [0]
    latest = run_dir / "latest"
    if latest.is_file():
        try:
            steps.append(int(json.loads((run_dir / latest.read_text().strip() / "state.json").read_text())["step"]))
        except (OSError, ValueError, KeyError):
            pass
    steps += [int(p.name.rsplit("-", 1)[1]) for p in (run_dir / "dpo").glob("checkpoint-*")
              if p.name.rsplit("-", 1)[1].isdigit()]
    return float(max(steps))


def _bus_step(info: ArtifactInfo) -> float:
    if info.headers.get("Flywheel-Completed") == "true":
        return math.inf
    try:
        return float(info.headers.get("Flywheel-Step", "0"))
    except ValueError:
        return 0.0


def _is_run(folder: Path) -> str | None:
    return None if _local_step(folder) > 0 else "it holds neither a checkpoint nor a completed run"


def _sync_run(run_dir: Path, run_id: str, artifacts: ThreadArtifacts | None) -> None:
    """Bring the run's newest checkpoint from the bus when it is ahead of the one here."""
    if artifacts is None or not artifacts.enabled:
        return
    info = artifacts.info("runs", run_id)
    if info is None or _bus_step(info) <= _local_step(run_dir):
        return
    try:
        artifacts.fetch("runs", run_id, _is_run)
        log.info("run %s: resuming from its checkpoint on the bus (step %s)", run_id, info.headers.get("Flywheel-Step"))
    except ArtifactCorrupt as exc:
        log.warning("run %s: its checkpoint on the bus is refused (%s); going on from what is here", run_id, exc)


class _RunPublisher:
    """Publishes the run folder after each checkpoint, in the background, one upload at a time."""

    def __init__(self, artifacts: ThreadArtifacts | None, run_id: str, run_dir: Path) -> None:
        self.artifacts = artifacts if artifacts is not None and artifacts.enabled else None
        self.run_id = run_id
        self.run_dir = run_dir
        self.pending: concurrent.futures.Future[Any] | None = None

    def checkpoint(self, step: int) -> None:
        if self.artifacts is None:
            return
        self.wait()
        self.pending = self.artifacts.publish_soon(
            "runs", self.run_id, self.run_dir, {"Flywheel-Step": str(step), "Flywheel-Completed": "false"}
        )

    def archived(self, step: int, archive: str | None, files: int) -> None:
        """A checkpoint another process has already packed (``launch.py``): upload its tar."""
        if archive is None:
            return
        if self.artifacts is None:
            Path(archive).unlink(missing_ok=True)
            return
        self.wait()
        self.pending = self.artifacts.upload_soon(
            "runs", self.run_id, Path(archive), files, {"Flywheel-Step": str(step), "Flywheel-Completed": "false"}
        )

    def completed(self, steps: int) -> None:
        if self.artifacts is None:
            return
        self.wait()
        self.artifacts.publish("runs", self.run_id, self.run_dir,
                               {"Flywheel-Step": str(steps), "Flywheel-Completed": "true"}, replace=True)

    def wait(self) -> None:
        """Wait for the upload in flight; one that failed is a warning (the next checkpoint tries again)."""
        if self.pending is None:
            return
        pending, self.pending = self.pending, None
        try:
            pending.result(timeout=self.artifacts.timeout_s if self.artifacts else None)
        except Exception as exc:  # the bus may be down for a while; training goes on
            log.warning("run %s: a checkpoint was not published: %r", self.run_id, exc)


class _ProgressBar:
    """A rich progress bar (steps, rate, ETA) on stderr when it is a terminal."""

    def __init__(self, run_id: str) -> None:
        self._bar: Any = None
        self._task: Any = None
        self._run_id = run_id

    def update(self, p: Progress) -> None:
        if not sys.stderr.isatty():
            return
        if self._bar is None:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            from flywheel_loop.engine.progress import RateColumn

            self._bar = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
                RateColumn(), TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn(),
                console=Console(stderr=True), transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(self._run_id, total=p.total_steps, completed=p.step - 1, loss=p.loss)
        self._bar.update(self._task, completed=p.step, loss=p.loss)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def train_dataset(
    settings: Settings,
    role: str,
    dataset_hash: str,
    dataset_path: str | Path | None = None,
    emit: Emit | None = None,
    on_step: Callable[[Progress], None] | None = None,
    artifacts: ThreadArtifacts | None = None,
) -> TrainingCompleted | TrainingFailed:
    """Train (or resume, or recall) the run for a dataset; the final event's payload.

    ``emit`` receives ``training.started`` and ``training.progressed`` payloads as they happen;
    ``on_step`` every step's progress (an exception it raises stops the run after that step's
    checkpoint, as a kill would). ``artifacts`` (the bus's store, from a worker thread) fetches
    what this machine lacks and publishes checkpoints and the adapter; without it, only local
    files are used."""
    cfg = TrainerConfig.of(settings)
    base_name = base_model_name(settings)
    run_id = run_id_for(role, dataset_hash, base_name, cfg)
    run_dir = settings.layout.run(run_id)

    def failed(reason: str, error: str = "") -> TrainingFailed:
        log.warning("training run %s failed: %s", run_id, reason)
        return TrainingFailed(run_id=run_id, role=role, reason=reason[:2000], error=error[:200_000])

    with _run_lock(settings.layout.runs, run_id):
        _sync_run(run_dir, run_id, artifacts)
        done_file = run_dir / "completed.json"
        if done_file.is_file():
            return TrainingCompleted.model_validate_json(done_file.read_text())
        try:
            folder = dataset_folder(settings, dataset_hash, artifacts, dataset_path)
        except DatasetUnusable as exc:
            return failed(str(exc))
        publisher = _RunPublisher(artifacts, run_id, run_dir)
        try:
            return _train_run(settings, cfg, role, dataset_hash, folder, run_id, run_dir, base_name, emit, on_step,
                              publisher, artifacts, failed)
        finally:
            publisher.wait()


def _train_run(
    settings: Settings,
    cfg: TrainerConfig,
    role: str,
    dataset_hash: str,
    folder: Path,
    run_id: str,
    run_dir: Path,
    base_name: str,
    emit: Emit | None,
    on_step: Callable[[Progress], None] | None,
    publisher: _RunPublisher,
    artifacts: ThreadArtifacts | None,
    failed: Callable[[str], TrainingFailed],
) -> TrainingCompleted | TrainingFailed:
    try:
        model_dir = base_model_dir(settings, artifacts)
    except BaseModelUnusable as exc:
        return failed(str(exc))
    # the settings [trainer] leaves open, picked by the dataset's size (the run id already names the dataset)
    cfg = sized(cfg, len(read_split(folder, "dpo_train" if cfg.method == "dpo" else "train")))
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = use_bf16(settings.models.precision, device, settings.state_dir)
    launched = cfg.processes > 1 and cfg.method == "sft"
    if cfg.processes > 1 and not launched:
        log.warning("run %s: trainer.processes applies to SFT; DPO trains in this process", run_id)
    hp = {**hyperparameters(cfg), "bf16": bf16, "precision": "bf16" if bf16 else "fp32", "threads": cfg.threads,
          "device": device, "processes": cfg.processes if launched else 1}
    loop_cfg = LoopSettings(**{k: getattr(cfg, k) for k in LOOP_FIELDS},
                            wall_clock_cap_s=cfg.wall_clock_cap_s, bf16=bf16,
                            patience=cfg.early_stopping_patience, cpu=device == "cpu")
    lineage = {
        "run_id": run_id,
        "role": role,
        "method": cfg.method,
        "dataset_hash": dataset_hash,
        "dataset_lineage": str(folder / "lineage.txt"),
        "base_model": base_name,
        "base_model_folder": str(model_dir),
        "hyperparameters": hp,
    }
    bar = _ProgressBar(run_id)
    last_report = [-math.inf]  # the training time (elapsed_s) of the last training.progressed

    def started() -> None:
        if emit is not None:
            emit(TrainingStarted(run_id=run_id, role=role, dataset_hash=dataset_hash, base_model=base_name,
                                 method=cfg.method, hyperparameters=hp))

    def progressed(p: Progress) -> None:
        bar.update(p)
        due = p.step % cfg.progress_every == 0 or p.final or p.step == p.total_steps or (
            cfg.progress_every_s is not None and p.elapsed_s - last_report[0] >= cfg.progress_every_s)
        if emit is not None and due:
            last_report[0] = p.elapsed_s
            emit(TrainingProgressed(run_id=run_id, step=p.step, total_steps=p.total_steps, epoch=p.epoch,
                                    loss=p.loss, val_loss=p.val_loss, tokens_per_s=p.tokens_per_s,
                                    elapsed_s=p.elapsed_s))
        if on_step is not None:
            on_step(p)

    try:
        if launched:
            started()
            outcome = _train_launched(settings, cfg, folder, run_dir, model_dir, loop_cfg, lineage, device == "cuda",
                                      progressed, publisher)
        else:
            outcome = _train_here(settings, cfg, dataset_hash, folder, run_dir, model_dir, loop_cfg, lineage, device,
                                  started, progressed, publisher)
    finally:
        bar.close()
    if isinstance(outcome, str):
        return failed(outcome)
    result, digest, adapter_dir = outcome
    if artifacts is not None:
        artifacts.publish("adapters", digest, adapter_dir)  # on the bus before any event names it
    completed = TrainingCompleted(
        run_id=run_id, role=role, adapter_hash=digest, path=str(adapter_dir), base_model=base_name,
        train_loss=result.train_loss, val_loss=result.val_loss, tokens_per_s=result.tokens_per_s,
        duration_s=result.duration_s,
        steps=result.steps,
        dataset_hash=dataset_hash,
        method=cfg.method,
        best_step=result.best_step,
        stopped_early=result.stopped_early,
    )
    (run_dir / "completed.json").write_text(completed.model_dump_json())
    publisher.completed(result.steps)
    return completed


def fit_router(rows: list[dict[str, Any]], threads: int | None) -> Router | None:
    """The adapter's router (``plugins/shared/routing.py``); None without rehearsal rows, or, with a warning,
    when the embedding model cannot be loaded (the adapter then answers everything, and is gated so)."""
    try:
        return Router.fit(rows, router_embedder(None, threads).embed)
    except RouterUnusable as exc:
        log.warning("no router for this adapter: %s", exc)
        return None


#: a trained run: (what the loop reports, the adapter's hash, its folder); or why there is none
Trained = tuple[RunResult, str, Path] | str


def _train_here(
    settings: Settings,
    cfg: TrainerConfig,
    dataset_hash: str,
    folder: Path,
    run_dir: Path,
    model_dir: Path,
    loop_cfg: LoopSettings,
    lineage: dict[str, Any],
    device: str,
    started: Callable[[], None],
    progressed: Callable[[Progress], None],
    publisher: _RunPublisher,
) -> Trained:
    """Train in this process (a GPU when there is one) and store the adapter."""
    try:
        model, tokenizer = load_base(model_dir)
    except BaseModelUnusable as exc:
        return str(exc)
    if cfg.method == "dpo":
        pairs = read_split(folder, "dpo_train")
        val_pairs = read_split(folder, "dpo_validation")
        if not pairs:
            return f"dataset {dataset_hash} has no preference pairs (dpo_train) for DPO"
    else:
        train = pack(tokenize_rows(read_split(folder, "train"), tokenizer, cfg.max_tokens), cfg.block_tokens)
        validation = pack(tokenize_rows(read_split(folder, "validation"), tokenizer, cfg.max_tokens),
                          cfg.block_tokens)
        if not train:
            return f"dataset {dataset_hash} has no training example with answer tokens"
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(cfg.seed)
    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,  # type: ignore[arg-type]
            target_modules=list(cfg.target_modules), task_type="CAUSAL_LM",
        ),
    ).to(device)
    if cfg.gradient_checkpointing:
        peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        peft_model.enable_input_require_grads()
    started()
    try:
        with torch_threads(cfg.threads if device == "cpu" else None):
            if cfg.method == "dpo":
                from flywheel_loop.plugins.training.dpo import train_dpo

                result = train_dpo(peft_model, tokenizer, pairs, val_pairs, loop_cfg, run_dir, cfg.dpo_beta,
                                   cfg.max_tokens, progressed, publisher.checkpoint)
            else:
                result = train_loop(peft_model, train, validation, loop_cfg, run_dir, tokenizer.pad_token_id,
                                    progressed, publisher.checkpoint)
    except WallClockExceeded as exc:
        return str(exc)
    except (torch.OutOfMemoryError, MemoryError) as exc:  # GPU memory, or host memory (a failed allocation)
        return (f"out of memory: {exc or type(exc).__name__}; lower trainer.batch, block_tokens or max_tokens,"
                " or turn on trainer.gradient_checkpointing")
    full = {**lineage, "steps": result.steps, "train_loss": result.train_loss, "val_loss": result.val_loss}
    router = fit_router(read_split(folder, "train"), cfg.threads) if cfg.route else None
    digest, adapter_dir = store_adapter(peft_model, settings.layout.adapters, full, router)
    return result, digest, adapter_dir


def _train_launched(
    settings: Settings,
    cfg: TrainerConfig,
    folder: Path,
    run_dir: Path,
    model_dir: Path,
    loop_cfg: LoopSettings,
    lineage: dict[str, Any],
    cuda: bool,
    progressed: Callable[[Progress], None],
    publisher: _RunPublisher,
) -> Trained:
    """Train as ``trainer.processes`` processes (``launch.py``), relaying what process 0 reports."""
    import dataclasses
    import os
    import signal
    import subprocess

    from flywheel_loop.plugins.training import launch

    run_dir.mkdir(parents=True, exist_ok=True)
    spec = run_dir / ".launch.json"
    spec.write_text(json.dumps({
        "base_model": str(model_dir), "dataset": str(folder), "run_dir": str(run_dir),
        "adapters": str(settings.layout.adapters), "trainer": cfg.model_dump(mode="json"),
        "loop": dataclasses.asdict(loop_cfg), "lineage": lineage, "publish": publisher.artifacts is not None,
    }))
    logfile = run_dir / ".launch.log"
    command = launch.command(cfg.processes, cuda, loop_cfg.bf16, spec)
    log.info("run %s: %s", run_dir.name, " ".join(command))
    outcome: Trained | None = None
    with open(logfile, "w") as errors:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, text=True, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                if not line.startswith(launch.PREFIX):
                    continue
                message = json.loads(line[len(launch.PREFIX):])
                if "progress" in message:
                    progressed(Progress(**message["progress"]))
                elif "checkpoint" in message:
                    point = message["checkpoint"]
                    publisher.archived(point["step"], point["archive"], point["files"])
                elif "failed" in message:
                    outcome = str(message["failed"])
                elif "result" in message:
                    run = message["result"]["run"]
                    run["val_losses"] = [(int(s), float(v)) for s, v in run["val_losses"]]
                    outcome = (RunResult(**run), message["result"]["adapter_hash"], Path(message["result"]["path"]))
            status = proc.wait()
        except BaseException:  # stopped from here (a kill, a step callback that raises): stop every process
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            raise
    if status != 0 or outcome is None:
        tail = "\n".join(logfile.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"the {cfg.processes} training processes of {run_dir.name} ended with status {status}"
                           f" and no result:\n{tail}")
    return outcome


class Trainer:
    """The processor: trains in a thread, publishing live events (``ctx.emit``) as it goes."""

    name = "trainer"

    async def handle(self, event: Event[Any], ctx: ProcessContext) -> list[Any]:
        data = event.data
        if isinstance(data, DatasetBuilt):
            role, digest, path = data.role, data.dataset_hash, data.path
        elif (isinstance(data, AdapterSuperseded) and data.action == "retrain" and data.new_dataset_hash
              and data.new_dataset_path):
            role, digest, path = data.role, data.new_dataset_hash, data.new_dataset_path
        else:
            return []

        def emit(payload: Payload) -> None:
            # live events get ids derived from the input and the step, so a resumed run
            # re-publishes nothing twice inside the duplicate window; a lost one is only a report
            index = payload.step if isinstance(payload, TrainingProgressed) else 0
            try:
                ctx.emit_threadsafe(payload, index)
            except Exception as exc:  # progress is best effort; the final event is not
                ctx.log.warning("trainer could not publish %s: %r", payload.event_type, exc)

        artifacts = ctx.artifacts.in_thread() if ctx.artifacts is not None else None
        outcome = await asyncio.to_thread(train_dataset, ctx.settings, role, digest, path, emit, None, artifacts)
        return [outcome]
