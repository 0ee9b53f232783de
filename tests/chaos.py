"""The chaos suite: steady load while workers and the NATS server die, then an audit of the log.

``bash ops/chaos [--rate 1000] [--duration 120] [--kill-every 10] [--workers 3] [--seed 0]``

What one run does:

1. starts an embedded ``nats-server`` and the engine as separate processes, the way an
   operator scales out: ``--workers`` processor processes (``flywheel up --only anonymizer
   --only scoring``, each with its own state folder: they share nothing but NATS) and two
   projection processes (``flywheel up --only scores --only anonymization
   --only log_index --only bandit_state``, each with its own state folder);
2. records events through the agent SDK (``Recorder``) at ``--rate`` events/s for
   ``--duration`` seconds: interactions, and outcomes and feedback that follow them by up
   to two seconds (late evidence), some with planted e-mail addresses and keys;
3. every ``--kill-every`` seconds SIGKILLs a random worker process and starts it again, and
   restarts the NATS server once (at half time);
4. drains (every durable consumer empty, every projection caught up), stops the workers,
   and audits: every recorded event is on the raw stream exactly once; every processor
   output is on the log exactly once (one per input for the anonymizer; for scoring, at most
   one per input and exactly what a fresh fold of the log scores; no id twice); no
   ``event.rejected``; every projection of every projection process equals a fresh replay
   of the log (``engine.replay``).

The engine processes run with ``worker.ack_wait_s = 5`` (a killed worker's batch goes to
another one within seconds) and a retry schedule (12 attempts, back-off capped at 5 s) that
outlasts a killed anonymizer and the server restart, so feedback that overtakes its
interaction is scored rather than rejected.

It prints a summary and exits 1 on any violation. ``--pipeline pass-through`` swaps the
built-in processors for the test suite's pass-through processor (``tests.counting_plugin``)
to load the runtime without the cost of the real steps.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import logging
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from flywheel_loop.engine.bus import Bus
from flywheel_loop.engine.config import Settings, load_settings
from flywheel_loop.engine.embedded import EmbeddedServer
from flywheel_loop.engine.projection import Projection
from flywheel_loop.engine.replay import differences, rebuild
from flywheel_loop.sdk.recorder import Recorder

ROOT = Path(__file__).resolve().parent.parent
PROJECTIONS = ("scores", "anonymization", "log_index", "bandit_state")
PROJECTION_PROCESSES = 2
AUDIT_BUDGET_MS = 10_000.0


@dataclass(frozen=True)
class ChaosOptions:
    """What to run: the load, the chaos, the topology; invalid values raise ``ValueError``."""

    rate: float = 1000.0
    duration: float = 120.0
    kill_every: float = 10.0
    workers: int = 3
    seed: int = 0
    pipeline: str = "builtin"  # or "pass-through"
    nats_restart_at: float | None = None  # seconds into the load; default: half of it
    drain_timeout: float = 1800.0
    work_dir: Path | None = None  # default: a temporary folder, removed afterwards
    show_progress: bool = True

    def __post_init__(self) -> None:
        problems = []
        if self.rate <= 0:
            problems.append(f"--rate {self.rate:g}: must be above 0 events/s")
        if self.duration <= 0:
            problems.append(f"--duration {self.duration:g}: must be above 0 seconds")
        if self.kill_every <= 0:
            problems.append(f"--kill-every {self.kill_every:g}: must be above 0 seconds")
        if self.workers < 1:
            problems.append(f"--workers {self.workers}: at least 1 processor process")
        if self.pipeline not in ("builtin", "pass-through"):
            problems.append(f"--pipeline {self.pipeline!r}: 'builtin' or 'pass-through'")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def restart_at(self) -> float:
        return self.duration / 2 if self.nats_restart_at is None else self.nats_restart_at


@dataclass
class Check:
    """One audited property: a violation when ``ok`` is false."""

    name: str
    expected: str
    actual: str
    ok: bool


@dataclass(frozen=True)
class Sample:
    """One reading, taken every second from the start of the load until the SDK has flushed."""

    t: float  # seconds since the load started
    sdk_pending: int  # recorded by the agent, not yet acknowledged by JetStream
    stored: int  # the raw stream's last sequence
    backlog: int  # messages the processors have not acknowledged (-1: the server did not answer)


@dataclass
class ChaosReport:
    """What a run did (load, kills, restarts, samples) and what the audit found."""

    options: ChaosOptions
    produced: Counter[str] = field(default_factory=Counter)
    load_s: float = 0.0
    drain_s: float = 0.0  # from the end of the load window until every projection caught up
    kills: list[str] = field(default_factory=list)
    nats_restarts: int = 0
    samples: list[Sample] = field(default_factory=list)
    stored_during_load: int = 0
    processors_drained_s: float = 0.0  # from the end of the load window (the SDK's flush included)
    unscored: int = 0
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    @property
    def produced_total(self) -> int:
        return sum(self.produced.values())

    def check(self, name: str, expected: Any, actual: Any, ok: bool | None = None) -> None:
        self.checks.append(Check(name, str(expected), str(actual), expected == actual if ok is None else ok))

    @property
    def peak_backlog(self) -> int:
        return max((x.backlog for x in self.samples), default=0)

    def figures(self) -> dict[str, Any]:
        return {
            "events": self.produced_total,
            "by_type": dict(self.produced),
            "target_rate": self.options.rate,
            "recorded_rate": round(self.produced_total / self.load_s, 1) if self.load_s else 0.0,
            # what JetStream had stored when the load window closed (the rest waited in the SDK's buffer)
            "stored_rate": round(self.stored_during_load / self.load_s, 1) if self.load_s else 0.0,
            "peak_sdk_buffer": max((x.sdk_pending for x in self.samples), default=0),
            # every event through every processor, from the first event to an empty backlog
            "processed_rate": round(self.produced_total / (self.load_s + self.processors_drained_s), 1)
            if self.load_s else 0.0,
            "peak_backlog": self.peak_backlog,
            "processors_drained_s": round(self.processors_drained_s, 1),
            "drain_s": round(self.drain_s, 1),
            "unscored_interactions": self.unscored,
            "worker_kills": len(self.kills),
            "nats_restarts": self.nats_restarts,
            "violations": [c.name for c in self.checks if not c.ok],
        }

    def table(self) -> Table:
        t = Table(title=f"chaos: {'PASS' if self.ok else 'FAIL'}", show_lines=False)
        t.add_column("check")
        t.add_column("expected", justify="right")
        t.add_column("actual", justify="right")
        t.add_column("", justify="center")
        for c in self.checks:
            t.add_row(c.name, c.expected, c.actual, "[green]ok[/green]" if c.ok else "[red]VIOLATION[/red]")
        return t


# --------------------------------------------------------------------------- processes


@dataclass
class WorkerProcess:
    """One engine process the chaos loop may kill; its output goes to a log file."""

    name: str
    args: list[str]
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self) -> None:
        self.starts += 1
        with self.log_path.open("ab") as out:
            out.write(f"--- start {self.starts} ---\n".encode())
            out.flush()
            self.process = subprocess.Popen(self.args, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """SIGTERM (the engine drains its batch in hand), then SIGKILL if it lingers."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


def engine_env(url: str, state_dir: Path) -> dict[str, str]:
    """The environment of an engine process: the shared server, its state folder, and
    retries long enough to outlast a killed peer's ack wait and a server restart."""
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "FLYWHEEL_NATS__URL": url,
        "FLYWHEEL_STATE_DIR": str(state_dir),
        "FLYWHEEL_ANONYMIZER__HASH_KEY": "chaos-suite-key",
        "FLYWHEEL_DASHBOARD__ENABLED": "false",  # many processes on one host: no web server each
        # A killed worker's unacked batch comes back after ack_wait: keep it short.
        "FLYWHEEL_WORKER__ACK_WAIT_S": "5",
        # Feedback that overtakes its interaction is retried until the interaction arrives;
        # give that grace (~40 s) room for a killed anonymizer and a server restart.
        "FLYWHEEL_WORKER__MAX_ATTEMPTS": "12",
        "FLYWHEEL_WORKER__MAX_BACKOFF_S": "5",
        "FLYWHEEL_NATS__PUBLISH_RETRY_S": "60",
        # An assessor's time budget is checked after the fact, so on a loaded machine whether it
        # holds depends on timing. The audit re-scores the log and compares score for score:
        # budgets no built-in assessor overruns keep scoring a function of the log alone.
        "FLYWHEEL_ASSESSMENT__BUDGET_MS": str(AUDIT_BUDGET_MS),
    }


def build_workers(opts: ChaosOptions, url: str, work: Path) -> tuple[list[WorkerProcess], list[Path]]:
    """The processor processes and projection processes; returns them and the projection state folders."""
    flywheel = str(Path(sys.executable).parent / "flywheel")
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    workers: list[WorkerProcess] = []
    if opts.pipeline == "pass-through":
        # The counting plugin runs its processor and its projection in one process.
        dirs = [work / f"worker-{i}" for i in range(opts.workers)]
        for i, d in enumerate(dirs):
            args = [sys.executable, "-m", "tests.counting_plugin", url, str(d)]
            workers.append(WorkerProcess(f"worker-{i}", args, engine_env(url, d), logs / f"worker-{i}.log"))
        return workers, dirs
    for i in range(opts.workers):  # each with its own state folder: processors share nothing but NATS
        args = [flywheel, "up", "--only", "anonymizer", "--only", "scoring"]
        state = work / f"processors-{i}"
        workers.append(WorkerProcess(f"processors-{i}", args, engine_env(url, state), logs / f"processors-{i}.log"))
    dirs = [work / f"projections-{j}" for j in range(PROJECTION_PROCESSES)]
    for j, d in enumerate(dirs):
        args = [flywheel, "up", *(a for p in PROJECTIONS for a in ("--only", p))]
        workers.append(WorkerProcess(f"projections-{j}", args, engine_env(url, d), logs / f"projections-{j}.log"))
    return workers, dirs


def processor_names(opts: ChaosOptions) -> tuple[str, ...]:
    return ("pass_through",) if opts.pipeline == "pass-through" else ("anonymizer", "scoring")


def projections_of(opts: ChaosOptions, settings: Settings) -> list[Projection]:
    if opts.pipeline == "pass-through":
        from tests.counting_plugin import Counted

        return [Counted()]
    from flywheel_loop.engine.plugin_host import PluginHost

    host = PluginHost(settings)
    return [p for p in host.projections() if p.name in PROJECTIONS]


# --------------------------------------------------------------------------- load


SECRETS = (
    "contact me at dev.lead@example.com",
    "key AKIAIOSFODNN7EXAMPLE in the config",
    "call +1 415 555 0100 after the build",
    "the box at 10.0.4.17 runs the tests",
)


class Load:
    """Interactions and the evidence that follows them, paced at ``rate`` events/s."""

    def __init__(self, opts: ChaosOptions) -> None:
        self.opts = opts
        self.rng = random.Random(opts.seed)
        self.ids: dict[str, str] = {}  # event id -> type
        self.later: list[tuple[float, int, str, str]] = []  # (due, tie, kind, interaction id)
        self._n = 0

    async def record_one(self, rec: Recorder, now: float) -> None:
        """Record the next event: due evidence first, else a new interaction."""
        if self.later and self.later[0][0] <= now:
            _, _, kind, iid = heapq.heappop(self.later)
            if kind == "outcome":
                eid = await rec.record_outcome(iid, compiles=self.rng.random() < 0.8,
                                               tests_passed=self.rng.randint(0, 9), tests_failed=self.rng.randint(0, 2))
                self.ids[eid] = "outcome.observed"
            else:
                eid = await rec.record_feedback(iid, rating=self.rng.randint(1, 5),
                                                implicit=self.rng.choice(["accepted", "modified", "rejected"]))
                self.ids[eid] = "feedback.given"
            return
        i = self._n
        self._n += 1
        note = self.rng.choice(SECRETS) if self.rng.random() < 0.2 else "no secrets here"
        if self.opts.pipeline == "pass-through":
            kinds: list[str] = []
        else:
            kinds = [k for k, p in (("outcome", 0.5), ("feedback", 0.3)) if self.rng.random() < p]
        eid = await rec.record_interaction(
            session_id=f"session-{i % 53}", role=self.rng.choice(["coder", "reviewer"]), model_id="smollm2-135m",
            prompt_variant=self.rng.choice(["plain", "terse"]), complexity=self.rng.choice(["simple", "complex"]),
            domain="python", input=f"task {i}: write slugify(title); {note}",
            output=f"```python\ndef slugify(title: str) -> str:\n    return '-'.join(title.lower().split())  # {i}\n```"
            if i % 2 else "use `'-'.join(title.lower().split())`",
            duration_ms=self.rng.uniform(100, 2000), cost_usd=self.rng.uniform(0, 0.01),
        )
        self.ids[eid] = "interaction.recorded"
        for kind in kinds:
            heapq.heappush(self.later, (now + self.rng.uniform(0.0, 2.0), self._n * 2 + len(self.later), kind, eid))

    async def run(self, rec: Recorder, duration: float, on_tick: Callable[[float], None]) -> float:
        """Record at the target rate for ``duration`` seconds; return the seconds it took."""
        start = time.monotonic()
        produced = 0
        while True:
            now = time.monotonic()
            elapsed = now - start
            if elapsed >= duration:
                break
            due = int(min(elapsed, duration) * self.opts.rate)
            while produced < due:
                await self.record_one(rec, now - start)
                produced += 1
            on_tick(elapsed)
            await asyncio.sleep(0.01)
        return time.monotonic() - start


# --------------------------------------------------------------------------- reading the streams


async def read_stream(bus: Bus, stream: str) -> list[dict[str, Any]]:
    """Every message of a stream, decoded (not validated), in order, with its sequence."""
    name = bus.streams.for_stream(stream)
    last = await bus.last_sequence(stream)
    out: list[dict[str, Any]] = []
    if last == 0:
        return out
    config = ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL, mem_storage=True,
                            inactive_threshold=60.0)
    sub = await bus.js.pull_subscribe(f"fw.{stream}.>", stream=name, config=config, pending_msgs_limit=10_000)
    try:
        seq = 0
        while seq < last:
            for msg in await sub.fetch(2000, timeout=10):
                seq = msg.metadata.sequence.stream
                event = orjson.loads(msg.data)
                event["_seq"] = seq
                out.append(event)
    finally:
        await sub.unsubscribe()
    return out


# --------------------------------------------------------------------------- the run


class ChaosRun:
    """One run: the server, the engine processes, the load, the chaos, the drain and the audit."""

    def __init__(self, opts: ChaosOptions, work: Path, console: Console) -> None:
        self.opts = opts
        self.work = work
        self.console = console
        self.rng = random.Random(opts.seed + 1)
        self.server = EmbeddedServer(work / "nats")
        self.report = ChaosReport(opts)
        self.workers: list[WorkerProcess] = []
        self.projection_dirs: list[Path] = []
        self.load = Load(opts)
        self.load_ended = 0.0  # monotonic time the load window closed

    async def run(self) -> ChaosReport:
        self.server.start()
        url = self.server.url
        settings = load_settings(
            state_dir=self.work / "driver",
            nats={"url": url, "publish_retry_s": 60},
            assessment={"budget_ms": AUDIT_BUDGET_MS},
        )
        bus = await Bus.connect(settings, url)
        await bus.ensure_streams()
        self.workers, self.projection_dirs = build_workers(self.opts, url, self.work)
        for w in self.workers:
            w.start()
        try:
            await self._wait_ready(bus, settings)
            await self._load(settings, url, bus)
            log = await self._drain(bus, settings)
            for w in self.workers:
                w.stop()
            await self._audit(bus, settings, log)
        finally:
            for w in self.workers:
                w.kill()
            await bus.close()
            self.server.stop()
        return self.report

    async def _load(self, settings: Settings, url: str, bus: Bus) -> None:
        opts = self.opts
        load = self.load
        progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(bar_width=20), TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"), console=self.console, disable=not opts.show_progress,
        )
        task = progress.add_task("chaos", total=opts.duration, status="")
        next_kill = opts.kill_every
        restarted = False
        chaos: list[asyncio.Task[None]] = []

        def tick(elapsed: float) -> None:
            nonlocal next_kill, restarted
            if elapsed >= next_kill:
                next_kill += opts.kill_every
                chaos.append(asyncio.create_task(self._kill_one(elapsed)))
            if not restarted and elapsed >= opts.restart_at:
                restarted = True
                chaos.append(asyncio.create_task(self._restart_nats(elapsed)))
            last = self.report.samples[-1] if self.report.samples else Sample(0, 0, 0, 0)
            progress.update(task, completed=elapsed, status=(
                f"recorded {len(load.ids):>7,} ({len(load.ids) / max(elapsed, 1e-9):>5,.0f}/s)  "
                f"stored {last.stored:>7,}  backlog {max(last.backlog, 0):>6,}  "
                f"kills {len(self.report.kills)}  NATS restarts {self.report.nats_restarts}"))

        with progress:
            # A buffer deep enough to hold the load through the server restart.
            async with Recorder(settings, url=url, source="chaos", capacity=int(opts.rate * 60) + 10_000,
                                max_block_s=30) as rec:
                monitor = asyncio.create_task(self._watch(bus, rec, time.monotonic()))
                self.report.load_s = await load.run(rec, opts.duration, tick)
                self.load_ended = time.monotonic()
                try:
                    self.report.stored_during_load = await bus.last_sequence("raw")
                except Exception:  # the server is restarting: the last reading will do
                    self.report.stored_during_load = self.report.samples[-1].stored if self.report.samples else 0
                while load.later:  # evidence still due after the load window
                    await load.record_one(rec, float("inf"))
                await asyncio.gather(*chaos)
                await rec.flush(300)
                monitor.cancel()
        self.report.produced = Counter(load.ids.values())

    async def _wait_ready(self, bus: Bus, settings: Settings, timeout_s: float = 180.0) -> None:
        """Start the load once every processor has its consumer and every projection its store."""
        deadline = time.monotonic() + timeout_s
        names = [p.name for p in projections_of(self.opts, settings)]
        with self.console.status(f"starting {len(self.workers)} engine processes"):
            while await self._backlog(bus) < 0 or not all(
                (d / "projections" / f"{n}.sqlite").exists() for d in self.projection_dirs for n in names
            ):
                if time.monotonic() > deadline:
                    dead = [w.name for w in self.workers if not w.alive]
                    raise TimeoutError(f"the engine processes were not ready in {timeout_s:g}s"
                                       f"{f' ({dead} exited; see their logs)' if dead else ''}")
                await asyncio.sleep(0.5)

    async def _kill_one(self, at: float) -> None:
        victim = self.rng.choice(self.workers)
        victim.kill()
        self.report.kills.append(f"{at:.0f}s {victim.name}")
        victim.start()

    async def _restart_nats(self, at: float) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.server.restart)
        self.report.nats_restarts += 1

    async def _backlog(self, bus: Bus) -> int:
        """Messages the processors have not acknowledged yet (pending + in flight)."""
        total = 0
        for name in processor_names(self.opts):
            stream = bus.streams.raw if name in ("anonymizer", "pass_through") else bus.streams.log
            try:
                info = await bus.js.consumer_info(stream, name, timeout=2)
            except Exception:  # not created yet, or the server is restarting
                return -1
            total += int(info.num_pending) + int(info.num_ack_pending or 0)
        return total

    async def _watch(self, bus: Bus, rec: Recorder, start: float) -> None:
        """Take a ``Sample`` every second."""
        stored = 0
        while True:
            backlog = await self._backlog(bus)
            try:
                stored = await bus.last_sequence("raw")
            except Exception:  # the server is restarting
                pass
            self.report.samples.append(Sample(time.monotonic() - start, rec.pending, stored, backlog))
            await asyncio.sleep(1.0)

    async def _drain(self, bus: Bus, settings: Settings) -> list[dict[str, Any]]:
        """Wait until every processor has acknowledged everything and every projection has
        folded the last event it consumes; return the log as it then stands."""
        deadline = time.monotonic() + self.opts.drain_timeout
        for w in self.workers:  # a worker killed by the last tick may still be starting
            if not w.alive:
                w.start()
        with self.console.status("draining: waiting for the processors to empty their consumers") as status:
            quiet = 0
            while quiet < 3:  # three empty readings in a row: nothing is waiting for a retry
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the processors did not drain in {self.opts.drain_timeout:g}s")
                backlog = await self._backlog(bus)
                quiet = quiet + 1 if backlog == 0 else 0
                status.update(f"draining: {backlog:,} messages not yet acknowledged")
                await asyncio.sleep(1.0)
            self.report.processors_drained_s = time.monotonic() - self.load_ended
            log = await read_stream(bus, "log")  # final: nothing else writes to the log now
            status.update("draining: waiting for the projections to reach the end of the log")
            for projection in projections_of(self.opts, settings):
                target = max((e["_seq"] for e in log if e["type"] in projection.consumes), default=0)
                for d in self.projection_dirs:
                    path = d / "projections" / f"{projection.name}.sqlite"
                    while position(path) < target:
                        if time.monotonic() > deadline:
                            raise TimeoutError(f"{path} did not reach log sequence {target} in time")
                        await asyncio.sleep(0.5)
        self.report.drain_s = time.monotonic() - self.load_ended
        return log

    async def _audit(self, bus: Bus, settings: Settings, log: list[dict[str, Any]]) -> None:
        report = self.report
        ids = self.load.ids
        raw = await read_stream(bus, "raw")
        stored = Counter(e["id"] for e in raw)
        report.check("raw stream: recorded events stored", f"{len(ids):,}", f"{sum(1 for i in ids if i in stored):,}")
        report.check("raw stream: stored twice", 0, sum(1 for n in stored.values() if n > 1))
        report.check("raw stream: not recorded by this run", 0, sum(1 for i in stored if i not in ids))

        on_log = Counter(e["id"] for e in log)
        report.check("log: the same event id twice", 0, sum(1 for n in on_log.values() if n > 1))
        rejected = [e for e in log if e["type"] == "event.rejected"]
        report.check("log: event.rejected", 0, len(rejected))
        for r in rejected[:5]:
            self.console.print(f"[red]rejected[/red] {r['data']['processor']}: {r['data']['reason'][:300]}")

        outputs: dict[str, Counter[str]] = {}
        for e in log:
            outputs.setdefault(e["source"], Counter())[e["causation_id"]] += 1
        first = "pass_through" if self.opts.pipeline == "pass-through" else "anonymizer"
        per_input = outputs.get(first, Counter())
        expected = [i for i, t in ids.items() if self.opts.pipeline == "builtin" or t == "interaction.recorded"]
        report.check(f"{first}: inputs with exactly one output", f"{len(expected):,}",
                     f"{sum(1 for i in expected if per_input.get(i) == 1):,}")
        report.check(f"{first}: outputs of unknown inputs", 0, sum(1 for i in per_input if i not in ids))
        if self.opts.pipeline == "builtin":
            await self._audit_scoring(log, outputs.get("scoring", Counter()), settings)

        for d in self.projection_dirs:
            for projection in projections_of(self.opts, settings):
                live = d / "projections" / f"{projection.name}.sqlite"
                fresh = self.work / "replay" / d.name / f"{projection.name}.sqlite"
                fresh.parent.mkdir(parents=True, exist_ok=True)
                await rebuild(bus, projection, fresh)
                diff = differences(live, fresh) if live.exists() else [f"{live} missing"]
                report.check(f"{d.name}/{projection.name} = fresh replay", "equal",
                             "equal" if not diff else "; ".join(diff), ok=not diff)

    async def _audit_scoring(self, log: list[dict[str, Any]], scored: Counter[str], settings: Settings) -> None:
        """Scoring may answer an input with no score (nothing changed, or every assessor fell
        back). Every scoring process folds its state from the log alone, so a fresh fold of the
        log, scored in log order by one process, must give exactly the scores on the log."""
        from flywheel_loop.engine.plugin_host import PluginHost
        from flywheel_loop.engine.processor import ProcessContext, apply_step
        from flywheel_loop.engine.state import ProcessorState
        from flywheel_loop.plugins.scoring.scorer import processor as scoring_processor
        from flywheel_loop.schemas import parse_event

        report = self.report
        anonymized = {e["id"] for e in log if e["source"] == "anonymizer"}
        report.check("scoring: inputs with more than one output", 0, sum(1 for n in scored.values() if n > 1))
        report.check("scoring: outputs of unknown inputs", 0, sum(1 for i in scored if i not in anonymized))
        events = [(e["_seq"], parse_event({k: v for k, v in e.items() if k != "_seq"})) for e in log]
        scoring = scoring_processor(settings)
        state = ProcessorState.open(scoring, self.work / "audit" / "scoring.sqlite")
        state.fold((seq, e) for seq, e in events if e.type != "quality.assessed")  # nothing answered yet
        host = PluginHost(settings)
        again: dict[str, list[dict[str, Any]]] = {}
        for seq, event in events:
            if event.type in scoring.consumes:
                ctx = ProcessContext(
                    settings=settings, log=logging.getLogger("audit"), plugins=host, sequence=seq, store=state
                )
                again[event.id] = [p.model_dump(mode="json") for p in await apply_step(scoring, event, ctx)]
        on_log = {e["causation_id"]: e["data"] for e in log if e["source"] == "scoring"}
        same = sum(1 for eid in anonymized if again.get(eid, []) == ([on_log[eid]] if eid in on_log else []))
        report.check("scoring: log outputs = a fresh fold's outputs", f"{len(anonymized):,}", f"{same:,}")
        state.close()
        interactions = {e["data"]["interaction_id"] for e in log if e["type"] == "quality.assessed"}
        recorded = [i for i, t in self.load.ids.items() if t == "interaction.recorded"]
        report.unscored = sum(1 for i in recorded if i not in interactions)


def position(path: Path) -> int:
    """The log sequence a projection store has folded up to (0 before it exists)."""
    if not path.exists():
        return 0
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT seq FROM _position").fetchone()
    except sqlite3.OperationalError:  # created but not initialised yet
        return 0
    finally:
        db.close()
    return int(row[0]) if row else 0


async def run_chaos(opts: ChaosOptions, console: Console | None = None) -> ChaosReport:
    """Run the chaos suite; the report says what held and what did not."""
    console = console or Console(stderr=True)
    if opts.work_dir is not None:
        opts.work_dir.mkdir(parents=True, exist_ok=True)
        return await ChaosRun(opts, opts.work_dir, console).run()
    work = Path(tempfile.mkdtemp(prefix="flywheel-chaos-"))
    try:
        report = await ChaosRun(opts, work, console).run()
    except BaseException:
        console.print(f"[yellow]kept the run's folder for inspection:[/yellow] {work}")
        raise
    if report.ok:
        shutil.rmtree(work, ignore_errors=True)
    else:
        console.print(f"[yellow]kept the run's folder (worker logs under logs/):[/yellow] {work}")
    return report


def print_report(report: ChaosReport, console: Console) -> None:
    f = report.figures()
    console.print(report.table())
    console.print(
        f"{f['events']:,} events ({', '.join(f'{t} {n:,}' for t, n in sorted(report.produced.items()))}) "
        f"recorded at {f['recorded_rate']:,.0f}/s (target {f['target_rate']:,.0f}/s) for {report.load_s:.0f}s, "
        f"stored by JetStream at {f['stored_rate']:,.0f}/s meanwhile (SDK buffer peaked at "
        f"{f['peak_sdk_buffer']:,}); "
        f"processors' backlog peaked at {f['peak_backlog']:,} messages and was empty {f['processors_drained_s']:.1f}s "
        f"after the load window (end to end {f['processed_rate']:,.0f} events/s), projections caught up after "
        f"{f['drain_s']:.1f}s; {f['worker_kills']} worker kills "
        f"({', '.join(report.kills) or '-'}); {f['nats_restarts']} NATS restart(s)"
    )
    if report.unscored:
        console.print(f"{report.unscored:,} interactions have no score: scoring answered them with none (no assessor "
                      "produced one for them)")
    if report.samples:
        shown = report.samples[:: max(1, len(report.samples) // 12)]
        console.print("seconds: SDK buffer / stored / processors' backlog -- " + ", ".join(
            f"{x.t:.0f}s: {x.sdk_pending:,}/{x.stored:,}/{x.backlog:,}" for x in shown))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ops/chaos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=1000.0, help="events/s recorded through the SDK")
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of load")
    parser.add_argument("--kill-every", type=float, default=10.0, help="seconds between worker kills")
    parser.add_argument("--workers", type=int, default=3, help="processor processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pipeline", choices=["builtin", "pass-through"], default="builtin")
    parser.add_argument("--nats-restart-at", type=float, default=None, help="seconds into the load (default: half)")
    parser.add_argument("--drain-timeout", type=float, default=1800.0,
                        help="seconds the processors and projections may take to catch up after the load")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep everything here (default: a temp folder)")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object on stdout")
    args = parser.parse_args(argv)
    try:
        opts = ChaosOptions(rate=args.rate, duration=args.duration, kill_every=args.kill_every,
                            workers=args.workers, seed=args.seed, pipeline=args.pipeline,
                            nats_restart_at=args.nats_restart_at, work_dir=args.work_dir,
                            drain_timeout=args.drain_timeout)
    except ValueError as exc:
        parser.error(str(exc))
    console = Console(stderr=True)
    report = asyncio.run(run_chaos(opts, console))
    print_report(report, console)
    if args.json:
        print(orjson.dumps(report.figures()).decode())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
