"""``flywheel train`` and ``flywheel runs``: start or request a training run and watch it;
list the runs and the gate's verdicts.

- ``flywheel train --role R`` publishes a manual ``training.requested`` and follows the log:
  the dataset built for it, the run's progress (a bar with rate and ETA from
  ``training.progressed``), its end, and the evaluation's verdict. The engine (``flywheel up``)
  does the work; Ctrl-C stops watching, not the run.
- ``flywheel train --role R --dataset HASH`` trains that dataset here, in this process, and
  publishes the run's events on the log like the trainer plugin would, so a running engine
  evaluates and deploys it. Killed, it resumes from its last checkpoint when started again.
- ``flywheel runs`` lists training runs and evaluations from the ``dashboard`` projection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from engine.config import Settings
from engine.connection import open_bus
from engine.progress import RateColumn
from schemas import Event, InvalidEvent, Payload, new_event, parse_event

console = Console()
err = Console(stderr=True)

FOLLOWED = ("dataset.built", "dataset.skipped", "training.started", "training.progressed", "training.completed",
            "training.failed", "evaluation.completed")


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

    def mine(self, event: Event[Any]) -> bool:
        d = event.data
        if event.type in ("dataset.built", "dataset.skipped"):
            return self.request_id is not None and getattr(d, "request_id", None) == self.request_id
        if event.type == "training.started":
            return self.dataset is not None and d.dataset_hash == self.dataset
        if event.type in ("training.progressed", "training.completed", "training.failed"):
            return self.run_id is not None and d.run_id == self.run_id
        if event.type == "evaluation.completed":
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
            err.print(f"dataset {d.dataset_hash[:12]} built: {dict(d.sizes)}")
        elif event.type == "training.started":
            self.run_id = d.run_id
            err.print(f"run {d.run_id} started on {d.base_model}")
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
            err.print(f"run {d.run_id} completed: adapter {d.adapter_hash[:12]}, val loss {d.val_loss}")
        elif event.type == "evaluation.completed":
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
            await sub.unsubscribe()


def _print_verdict(watcher: RunWatcher) -> None:
    if watcher.failed:
        console.print(f"[red]{watcher.failed}[/red]")
        return
    v = watcher.verdict
    colour = "green" if v.passed else "red"
    console.print(f"[{colour}]evaluation: {'passed' if v.passed else 'rejected'}[/{colour}]")
    for reason in v.reasons:
        console.print(f"  {reason}")


def register(app: typer.Typer, settings: Callable[[], Settings], run: Callable[..., Any]) -> None:
    @app.command()
    def train(
        role: Annotated[str, typer.Option(help="the agent role to train")],
        dataset: Annotated[str | None, typer.Option(help="train this dataset (hash or unique prefix) here")] = None,
        wait: Annotated[bool, typer.Option(help="follow the run on the log until its verdict")] = True,
        timeout: Annotated[float | None, typer.Option(help="stop following after this many seconds")] = None,
    ) -> None:
        """Train a role now: request a run from the engine, or train a dataset in this process."""
        cfg = settings()
        if dataset is not None:
            _train_here(cfg, role, dataset, run)
            return
        from plugins.training_trigger import request_training

        async def request() -> tuple[Event[Any], int]:
            async with open_bus(cfg) as bus:
                event = await request_training(bus, role)
                return event, await bus.last_sequence("log")

        event, seq = run(request)
        console.print(f"requested training for {role} up to log sequence {event.data.log_position} ({event.id})")
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
            err.print(f"[yellow]no verdict after {timeout:g}s[/yellow]; see `flywheel runs` later")
            raise typer.Exit(1) from None
        _print_verdict(watcher)

    @app.command()
    def runs(
        role: Annotated[str | None, typer.Option(help="only this role")] = None,
        as_json: Annotated[bool, typer.Option("--json")] = False,
    ) -> None:
        """Training runs and evaluations with their figures and the gate's verdicts."""
        from engine.cli import catch_up_projections
        from engine.dashboard.queries import PROJECTION_NAME, DashboardData, projection_file

        cfg = settings()
        catch_up_projections(cfg, [PROJECTION_NAME])
        data = DashboardData(projection_file(cfg.state_dir))
        runs_ = [r for r in data.page("training").get("runs", []) if role in (None, r.get("role"))]
        evals = [e for e in data.page("evaluations").get("evaluations", []) if role in (None, e.get("role"))]
        if as_json:
            console.print_json(orjson.dumps({"runs": runs_, "evaluations": evals}, default=str).decode())
            return
        t = Table("run", "role", "status", "steps", "train loss", "val loss", "tokens/s", "adapter", title="runs")
        for r in runs_:
            t.add_row(r["run_id"], r.get("role") or "", r["status"], f"{r['step']}/{r['total_steps']}",
                      _fmt(r.get("train_loss")), _fmt(r.get("val_loss")), _fmt(r.get("tokens_per_s"), 0),
                      (r.get("adapter_hash") or r.get("reason") or "")[:24])
        console.print(t)
        t = Table("run", "role", "verdict", "figures (candidate / in service)", "reasons", title="evaluations")
        for e in evals:
            figures = "\n".join(f"{m['name']}: {_fmt(m['candidate'])} / {_fmt(m['baseline'])}" for m in e["metrics"])
            t.add_row(e["run_id"], e["role"], "[green]passed[/green]" if e["passed"] else "[red]rejected[/red]",
                      figures, "\n".join(e["reasons"]))
        console.print(t)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _train_here(cfg: Settings, role: str, dataset: str, run: Callable[..., Any]) -> None:
    """Train ``dataset`` in this process, publishing the run's events on the log."""
    from plugins.dataset_store import DatasetNotFound, find_dataset
    from plugins.lora_trainer import train_dataset

    try:
        folder = find_dataset(cfg, dataset)
    except DatasetNotFound as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None

    async def main() -> Payload:
        async with open_bus(cfg) as bus:
            loop = asyncio.get_running_loop()

            def emit(payload: Payload) -> None:
                asyncio.run_coroutine_threadsafe(bus.publish(new_event(payload, source="cli")), loop).result(120)

            outcome = await asyncio.to_thread(train_dataset, cfg, role, folder.name, folder, emit)
            await bus.publish(new_event(outcome, source="cli"))
            return outcome

    outcome = run(main)
    if outcome.event_type == "training.failed":
        console.print(f"[red]training failed:[/red] {outcome.reason}")
        raise typer.Exit(1)
    console.print(f"adapter {outcome.adapter_hash} at {outcome.path} (val loss {outcome.val_loss});"
                  " a running engine evaluates it next")
