"""Greedy requests to one served version that arrive together are generated together.

On a CPU a small model's next token costs a read of every weight (SmolLM2-135M in float32: about 540 MB
a token, more than the caches hold), so the rows of a batch share that read: eight answers cost little more
than one. ``GreedyBatcher.complete`` queues a request; whichever request holds the version's generation lock
takes the queued ones (oldest first, up to ``max_batch``) and generates them as one left-padded batch, each
row ending at its own end-of-text token or its own ``max_tokens``. Requests that arrive while a batch is
generating make up the next one; a request that finds the version idle first waits for companions while
they keep arriving (``window_s`` at a time, at most ``MAX_WINDOWS`` of them: an agent sending several
requests at once). Streaming and sampled requests are not queued here: they generate alone under the
same lock.

What a caller gets is what the version would answer alone, except where the matrix products of a batch
round differently in the last bits and greedy decoding meets a near tie (SmolLM2-135M on the demo's 12
held-out prompts, 100 tokens each, 1 thread: the same 12 answers alone and as one batch, in 35 s against 135
s); a batch of one is exactly the request alone. A batch that fails is tried again a request at a time, so
one bad request fails alone. A caller is answered when its whole batch ends, so a short request waits for
the longest of its batch. ``max_batch = 1`` turns batching off.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

__all__ = ["GreedyBatcher"]

#: the longest an idle version waits for companions of a first request: this many windows
MAX_WINDOWS = 10

#: ``generate(prompts, limits)``: per prompt (token ids), the generated ids up to its end-of-text token,
#: at most its limit
BatchGenerate = Callable[[Sequence[list[int]], Sequence[int]], list[list[int]]]


@dataclass
class _Job:
    prompt: list[int]
    max_tokens: int
    done: threading.Event = field(default_factory=threading.Event)
    answer: list[int] | None = None
    error: BaseException | None = None


class GreedyBatcher:
    """Batches concurrent greedy requests to one model; see the module docstring."""

    def __init__(self, generate: BatchGenerate, lock: threading.Lock, max_batch: int = 16,
                 window_s: float = 0.01) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._generate = generate
        self.lock = lock  # the version's generation lock, shared with its streaming and sampled requests
        self.max_batch = max_batch
        self.window_s = window_s
        self._queue: list[_Job] = []
        self._queue_lock = threading.Lock()
        #: how many batches were generated, and how many requests they held (what a test or a log can read)
        self.batches = 0
        self.requests = 0

    def complete(self, prompt: list[int], max_tokens: int) -> list[int]:
        """The greedy answer's token ids to ``prompt`` (up to the end-of-text token, at most ``max_tokens``)."""
        job = _Job(list(prompt), max_tokens)
        with self._queue_lock:
            self._queue.append(job)
        if self.window_s > 0 and self.max_batch > 1 and not self.lock.locked():
            self._gather()
        while not job.done.is_set():
            with self.lock:
                if not job.done.is_set():
                    self._run_next()
        if job.error is not None:  # a fresh exception per caller: their tracebacks stay apart
            raise RuntimeError(str(job.error)) from job.error
        assert job.answer is not None
        return job.answer

    def _gather(self) -> None:
        """An idle version: wait while requests sent with this one are still arriving (a window passes with
        none new, the batch is full, or ``MAX_WINDOWS`` windows have passed)."""
        for _ in range(MAX_WINDOWS):
            with self._queue_lock:
                queued = len(self._queue)
            if queued >= self.max_batch:
                return
            time.sleep(self.window_s)
            with self._queue_lock:
                if len(self._queue) == queued:
                    return

    def _run_alone(self, job: _Job) -> None:
        try:
            [job.answer] = self._generate([job.prompt], [job.max_tokens])
            self.batches += 1
            self.requests += 1
        except BaseException as exc:  # noqa: BLE001 - handed to the request's caller
            job.error = exc
        job.done.set()

    def _run_next(self) -> None:
        """Generate the oldest queued requests as one batch (the caller holds the lock)."""
        with self._queue_lock:
            batch = self._queue[: self.max_batch]
            del self._queue[: self.max_batch]
        if not batch:
            return
        try:
            answers = self._generate([j.prompt for j in batch], [j.max_tokens for j in batch])
            if len(answers) != len(batch):
                raise RuntimeError(f"generated {len(answers)} answers for a batch of {len(batch)}")
        except Exception as exc:
            if len(batch) > 1:  # one request may be the cause (a prompt too long for memory): each alone
                for job in batch:
                    self._run_alone(job)
                return
            batch[0].error = exc
            batch[0].done.set()
            return
        except BaseException as exc:  # every request of the batch answers with the failure; none hangs
            for job in batch:
                job.error = exc
                job.done.set()
            raise
        self.batches += 1
        self.requests += len(batch)
        for job, answer in zip(batch, answers, strict=True):
            job.answer = answer
            job.done.set()
