"""``flywheel train``: start or request a training run and watch it.

- ``flywheel train --role R`` publishes a manual ``training.requested`` and follows the log:
  the dataset built for it, the run's progress (a bar with rate and ETA from
  ``training.progressed``), its end, and the evaluation's verdict. The engine (``flywheel up``)
  does the work; Ctrl-C stops watching, not the run.
- ``flywheel train --role R --dataset HASH`` trains that dataset here, in this process, and
  publishes the run's events on the log like the trainer plugin would, so a running engine
  evaluates and deploys it. Killed, it resumes from its last checkpoint when started again (here,
  or on any machine: the checkpoints are on the bus). A full hash this machine does not have is
  fetched from the bus.

``flywheel runs`` (the insight feature) lists the runs and the gate's verdicts.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.text import Text

from flywheel_loop.engine.commands import err, fail, open_bus, run, say, settings
from flywheel_loop.engine.config import Settings
from flywheel_loop.engine.progress import RateColumn
from flywheel_loop.schemas import (
    Event,
    InvalidEvent,
    Payload,
    TrainingCompleted,
    TrainingFailed,
    new_event,
    parse_event,
)

FOLLOWED = ("sampling.completed", "dataset.built", "dataset.skipped", "training.started", "training.progressed",
            "training.completed", "training.failed", "evaluation.progressed", "evaluation.completed")


def _bar() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
        RateColumn(), TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(), console=err,
    )


class RunWatcher:
    """Folds the events of one request into what a person wants to see, as they come."""

    def __init__(self, request_id: str | None, role: str) -> None:
        self.request_id = request_id
        self.role = role
        self.dataset: str | None = None
        self.run_id: str | None = None
        self.adapter: str | None = None
        self.verdict: Any = None
        self.failed: str | None = None
        self.bar = _bar()
        self.task: Any = None
        self.eval_bar: Progress | None = None
        self.eval_task: Any = None

    def mine(self, event: Event[Any]) -> bool:
        d = event.data
        if event.type == "sampling.completed":  # an rft round: its dataset answers the round, not the request
            if self.request_id is not None and d.request_id == self.request_id:
                err.print(Text(f"sampled {d.tasks} tasks x {d.k}: pass@1 {d.pass_at_1:.3f}, pass@{d.k}"
                               f" {d.pass_at_k:.3f}; building the dataset"))
                self.request_id = event.id
            return False
        if event.type in ("dataset.built", "dataset.skipped"):
            return self.request_id is not None and getattr(d, "request_id", None) == self.request_id
        if event.type == "training.started":
            return self.dataset is not None and d.dataset_hash == self.dataset
        if event.type in ("training.progressed", "training.completed", "training.failed"):
            return self.run_id is not None and d.run_id == self.run_id
        if event.type in ("evaluation.progressed", "evaluation.completed"):
            return self.run_id is not None and d.run_id == self.run_id
        return False

    def see(self, event: Event[Any]) -> bool:
        """Take one event; True when the story is over (a verdict, a failure, a skip)."""
        if not self.mine(event):
            return False
        d = event.data
        if event.type == "dataset.skipped":
            self.failed = f"no dataset: {d.reason} ({d.detail})"
            return True
        if event.type == "dataset.built":
            self.dataset = d.dataset_hash
            err.print(Text(f"dataset {d.dataset_hash[:12]} built: {dict(d.sizes)}"))
        elif event.type == "training.started":
            self.run_id = d.run_id
            err.print(Text(f"run {d.run_id} started on {d.base_model}"))
        elif event.type == "training.progressed":
            if self.task is None:
                self.bar.start()
                self.task = self.bar.add_task(self.run_id or "", total=d.total_steps, loss="-")
            loss = f"{d.loss:.4f}" if d.loss is not None else "-"
            self.bar.update(self.task, completed=d.step, loss=loss)
        elif event.type == "training.failed":
            self.bar.stop()
            self.failed = f"training failed: {d.reason}"
            return True
        elif event.type == "training.completed":
            self.bar.stop()
            self.adapter = d.adapter_hash
            err.print(Text(f"run {d.run_id} completed: adapter {d.adapter_hash[:12]}, val loss {d.val_loss}"))
        elif event.type == "evaluation.progressed":  # the gate's steps, one bar per step
            if self.eval_bar is None:
                self.eval_bar = Progress(TextColumn("[bold]evaluating {task.description}"), BarColumn(),
                                         MofNCompleteColumn(), TextColumn("step {task.fields[step]}"), console=err)
                self.eval_bar.start()
                self.eval_task = self.eval_bar.add_task(d.step, total=max(1, d.total), step="")
            self.eval_bar.update(self.eval_task, description=d.step, total=max(1, d.total), completed=d.done,
                                 step=f"{d.steps_done + 1}/{d.steps_total}")
        elif event.type == "evaluation.completed":
            if self.eval_bar is not None:
                self.eval_bar.stop()
            self.verdict = d
            return True
        return False


async def _follow(settings: Settings, watcher: RunWatcher, from_seq: int, timeout: float | None) -> None:
    async with open_bus(settings, ensure_streams=False) as bus:
        from nats.js.api import ConsumerConfig, DeliverPolicy

        start = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=max(1, from_seq))
        sub = await bus.js.subscribe("fw.log.>", ordered_consumer=True, stream=bus.streams.for_stream("log"),
                                     config=start)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        try:
            while deadline is None or loop.time() < deadline:
                try:
                    msg = await sub.next_msg(timeout=1.0)
                except Exception:  # nats' timeout
                    continue
                try:
                    event = parse_event(msg.data)
                except InvalidEvent:
                    continue
                if event.type in FOLLOWED and watcher.see(event):
                    return
            raise TimeoutError
        finally:
            watcher.bar.stop()
            if watcher.eval_bar is not None:
                watcher.eval_bar.stop()
            await sub.unsubscribe()


def _print_verdict(watcher: RunWatcher) -> None:
    if watcher.failed:
        say(watcher.failed, style="red")
        return
    v = watcher.verdict
    outcome = v.outcome  # passed, failed or inconclusive (deployed as a canary or refused: deployer.on_inconclusive)
    say(f"evaluation: {outcome}", style={"passed": "green", "inconclusive": "yellow"}.get(outcome, "red"))
    for reason in v.reasons:
        say(f"  {reason}")


def register(app: typer.Typer) -> None:
    """Add ``flywheel train`` to ``app``."""

    @app.command()
    def train(
        role: Annotated[str, typer.Option(help="the agent role to train")],
        dataset: Annotated[str | None, typer.Option(help="train this dataset (hash or unique prefix) here")] = None,
        wait: Annotated[bool, typer.Option(help="follow the run on the log until its verdict")] = True,
        timeout: Annotated[float | None, typer.Option(help="stop following after this many seconds")] = None,
        method: Annotated[str, typer.Option(help="data: the curated dataset, or rft: a round of learning from"
                                            " verified attempts (sample, check against tests, build, train)")] = "data",
    ) -> None:
        """Train a role now: request a run from the engine, or train a dataset in this process."""
        cfg = settings()
        if method not in ("data", "rft"):
            fail(f"--method is data or rft, got {method!r}")
        if dataset is not None:
            if method == "rft":
                fail("--method rft samples the model in service; it takes no --dataset")
            _train_here(cfg, role, dataset)
            return
        from flywheel_loop.plugins.shared.training_requests import request_sampling, request_training

        async def request() -> tuple[Event[Any], int]:
            async with open_bus(cfg) as bus:
                event = await (request_sampling(bus, role) if method == "rft" else request_training(bus, role))
                return event, await bus.last_sequence("log")

        event, seq = run(request)
        what = "an rft round (sampling)" if method == "rft" else "training"
        say(f"requested {what} for {role} up to log sequence {event.data.log_position} ({event.id})")
        if not wait:
            return
        err.print("following the run on the log (the engine, `flywheel up`, does the work; Ctrl-C stops watching)")
        watcher = RunWatcher(event.id, role)
        try:
            run(lambda: _follow(cfg, watcher, seq, timeout))
        except KeyboardInterrupt:
            err.print("stopped watching; the run goes on in the engine (see `flywheel runs`)")
            raise typer.Exit(130) from None
        except TimeoutError:
            fail(f"no verdict after {timeout:g}s; see `flywheel runs` later", code=1, label="waiting")
        _print_verdict(watcher)


def _train_here(cfg: Settings, role: str, dataset: str) -> None:
    """Train ``dataset`` in this process, publishing the run's events on the log (a full hash this
    machine does not have is fetched from the bus)."""
    import re

    from flywheel_loop.plugins.shared.datasets import DatasetNotFound, find_dataset
    from flywheel_loop.plugins.training.trainer import train_dataset

    try:
        digest: str = find_dataset(cfg, dataset).name
    except DatasetNotFound as exc:
        if not re.fullmatch(r"[0-9a-f]{64}", dataset.strip().lower()):
            fail(f"{exc} (a full hash is fetched from the bus)")
        digest = dataset.strip().lower()

    async def main() -> TrainingCompleted | TrainingFailed:
        async with open_bus(cfg) as bus:
            loop = asyncio.get_running_loop()

            def emit(payload: Payload) -> None:
                asyncio.run_coroutine_threadsafe(bus.publish(new_event(payload, source="cli")), loop).result(120)

            outcome = await asyncio.to_thread(train_dataset, cfg, role, digest, None, emit, None,
                                              bus.artifacts.in_thread())
            await bus.publish(new_event(outcome, source="cli"))
            return outcome

    outcome = run(main)
    if isinstance(outcome, TrainingFailed):
        fail(outcome.reason, code=1, label="training failed")
    say(f"adapter {outcome.adapter_hash} at {outcome.path} (val loss {outcome.val_loss});"
        " a running engine evaluates it next")
