"""Live progress of an evaluation: ``evaluation.progressed`` every few seconds while it runs.

The evaluator tells ``EvalProgress`` which step starts (``step``) and how far it got
(``advance``); a ticker thread publishes the current state every ``every_s`` seconds (and each
time a step starts), so a watcher's bar moves even while one long generation batch runs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from types import TracebackType

from flywheel_loop.schemas import EvaluationProgressed

__all__ = ["LOADING", "EvalProgress"]

Emit = Callable[[EvaluationProgressed], None]
#: the step before the first: the adapters are being loaded
LOADING = "loading the models"


class EvalProgress:
    """Counts one evaluation's steps and items; publishes through ``emit`` (None: counts only)."""

    def __init__(self, run_id: str, role: str, steps_total: int, emit: Emit | None, every_s: float = 2.0) -> None:
        self.run_id, self.role = run_id, role
        self.emit, self.every_s = emit, every_s
        self.steps_total = steps_total
        self.steps_done = -1
        self.name = LOADING
        self.done = self.total = 0
        self.started = time.monotonic()
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None
        #: every state published, in order (what a watcher saw)
        self.published: list[EvaluationProgressed] = []

    def __enter__(self) -> EvalProgress:
        if self.emit is not None:
            self.thread = threading.Thread(target=self._tick, name=f"eval-progress-{self.run_id}", daemon=True)
            self.thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stopped.set()
        if self.thread is not None:
            self.thread.join(timeout=self.every_s + 5)

    def step(self, name: str, total: int) -> None:
        """A new step starts, with ``total`` items to do."""
        with self.lock:
            self.steps_done += 1
            self.name, self.done, self.total = name, 0, total
        self._publish()

    def advance(self, n: int = 1) -> None:
        with self.lock:
            self.done = min(self.total, self.done + n)

    def _snapshot(self) -> EvaluationProgressed:
        with self.lock:
            return EvaluationProgressed(
                run_id=self.run_id, role=self.role, step=self.name[:2000], done=self.done, total=self.total,
                steps_done=max(0, self.steps_done), steps_total=self.steps_total,
                elapsed_s=round(time.monotonic() - self.started, 3),
            )

    def _publish(self) -> None:
        if self.emit is None:
            return
        event = self._snapshot()
        self.published.append(event)
        try:
            self.emit(event)
        except Exception as exc:  # progress is best effort: the verdict is what counts
            import logging

            logging.getLogger(__name__).warning("evaluation progress not published: %s", exc)

    def _tick(self) -> None:
        while not self.stopped.wait(self.every_s):
            self._publish()
