"""A processor: a pure step from one event to the events it causes, and what the engine
hands it besides its input (``ProcessContext``)."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flywheel_loop.engine.artifacts import ArtifactStore
from flywheel_loop.engine.config import Settings
from flywheel_loop.engine.consumes import ConsumesEvents
from flywheel_loop.engine.layout import StateLayout
from flywheel_loop.engine.state import ProcessorState
from flywheel_loop.schemas import CATALOGUE, Event, Payload, filter_subjects

if TYPE_CHECKING:
    from flywheel_loop.engine.plugin_host import PluginHost

Outputs = Iterable[Payload] | None

#: reads the log: (event types, up to this sequence or None for the end) -> (sequence, event) in order
LogReader = Callable[[Sequence[str], int | None], Awaitable[list[tuple[int, Event[Any]]]]]
#: publishes one live event (progress) derived from the input being handled; ``index`` keeps ids distinct
Emitter = Callable[[Payload, int], Awaitable[None]]


class NoState(RuntimeError):
    """A processor used ``ctx.state`` without declaring ``stateful=True``."""


@dataclass
class ProcessContext:
    """What a handler may use besides its input: the settings and the state layout, its own
    state store, the log up to a position, a way to publish live events, the artifact store
    (``ctx.artifacts``: datasets, adapters, checkpoints and base models on the bus), a logger, and
    the plugin host's typed hooks (``ctx.plugins.assessors()``, ...)."""

    settings: Settings
    log: logging.Logger
    attempt: int = 1
    plugins: PluginHost | None = None
    #: the stream sequence of the event being handled (0 outside a worker)
    sequence: int = 0
    #: the processor's state store (``stateful=True`` processors); committed with the memo
    store: ProcessorState | None = None
    reader: LogReader | None = None
    emitter: Emitter | None = None
    loop: asyncio.AbstractEventLoop | None = None
    #: the bus's artifact store (None outside a worker: local files only)
    artifacts: ArtifactStore | None = None

    @property
    def layout(self) -> StateLayout:
        return StateLayout(self.settings.state_dir)

    @property
    def state(self) -> ProcessorState:
        if self.store is None:
            raise NoState("this processor keeps no state: register it with Processor(..., stateful=True)")
        return self.store

    async def read_log(self, types: Sequence[str], until: int | None = None) -> list[tuple[int, Event[Any]]]:
        """(sequence, event) of every event of ``types`` on the log up to ``until`` (None: the end
        of the log now), in order; messages that do not validate are skipped."""
        if self.reader is None:
            raise RuntimeError("the log can be read only inside a worker (or a context given a reader)")
        return await self.reader(types, until)

    async def emit(self, payload: Payload, index: int = 0) -> None:
        """Publish a live event (``training.progressed``, ...) now, caused by the input being
        handled; its id is derived from the input, the processor and ``index``, so a retried
        input re-publishes nothing twice inside the duplicate window. Best effort: the final
        outputs are what the handler returns."""
        if self.emitter is None:
            raise RuntimeError("live events can be emitted only inside a worker")
        await self.emitter(payload, index)

    def emit_threadsafe(self, payload: Payload, index: int = 0, timeout: float = 120.0) -> None:
        """``emit`` from a worker thread (a handler that runs its heavy part in ``asyncio.to_thread``)."""
        if self.loop is None:
            raise RuntimeError("live events can be emitted only inside a worker")
        try:
            on_loop = asyncio.get_running_loop() is self.loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            raise RuntimeError("emit_threadsafe is for worker threads; await ctx.emit() on the event loop")
        asyncio.run_coroutine_threadsafe(self.emit(payload, index), self.loop).result(timeout=timeout)


Handler = Callable[[Event[Any], ProcessContext], Outputs | Awaitable[Outputs]]


async def apply_step(
    processor: Processor,
    event: Event[Any],
    ctx: ProcessContext,
    wait: Callable[[Awaitable[Outputs]], Awaitable[Outputs]] | None = None,
) -> list[Payload]:
    """What the worker does with one valid input: for a stateful processor, answer a redelivery
    from the memo, or run the step inside the state transaction and remember what it produced;
    for a stateless one, run the step. ``wait`` awaits a step that is a coroutine (the worker's
    keeps the message alive meanwhile)."""

    async def run() -> list[Payload]:
        result = processor.handle(event, ctx)
        if inspect.isawaitable(result):
            result = await (wait(result) if wait is not None else result)
        return list(result or ())

    if not processor.stateful:
        return await run()
    store = ctx.state
    remembered = store.recall(event.id)
    check = processor.still_valid
    if remembered is not None and (check is None or check(remembered)):
        return remembered  # a redelivery: exactly what the first delivery produced
    with store.transaction():
        produced = await run()
        store.remember(event.id, produced)
    return produced


@dataclass(frozen=True)
class Processor(ConsumesEvents):
    """One step of the flywheel, consuming ``consumes`` on a durable consumer named ``name``.

    ``stateful``: the engine keeps a state store for it (``ctx.state``; ``tables`` is SQL run
    when the store is created) and answers a redelivered input from the output memo without
    calling ``handle`` again. ``still_valid`` (optional) may refuse a remembered answer whose
    artifact is gone, so the input is handled again (a dataset folder deleted from the cache).
    ``on_start`` / ``on_stop`` (optional) bracket the worker's life.
    """

    name: str
    consumes: tuple[str, ...]
    handle: Handler
    description: str = ""
    batch: int | None = field(default=None, compare=False)
    stateful: bool = False
    tables: str = ""
    still_valid: Callable[[list[Payload]], bool] | None = field(default=None, compare=False)
    #: called once when its worker starts (before the first fetch), e.g. to serve again what is in service
    on_start: Callable[[ProcessContext], None] | None = field(default=None, compare=False)
    #: called once when the engine stops, e.g. to stop the servers it started
    on_stop: Callable[[], None] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not self.name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"processor name {self.name!r}: letters, digits, '-' and '_' only")
        unknown = [t for t in self.consumes if t not in CATALOGUE]
        if unknown or not self.consumes:
            raise ValueError(f"processor {self.name!r} consumes unknown event types {unknown}")
        filter_subjects(self.consumes)  # raises when the types span both streams
