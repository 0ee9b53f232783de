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
from flywheel_loop.engine.state import Folder, ProcessorState
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
    folded state, the log up to a position, a way to publish live events, the artifact store
    (``ctx.artifacts``: datasets, adapters, checkpoints and base models on the bus), a logger, and
    the plugin host's typed hooks (``ctx.plugins.assessors()``, ...)."""

    settings: Settings
    log: logging.Logger
    attempt: int = 1
    plugins: PluginHost | None = None
    #: the stream sequence of the event being handled (0 outside a worker)
    sequence: int = 0
    #: the processor's folded state (``stateful=True`` processors), up to the end of the log
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
        of the log now), in order, personal text opened (a forgotten subject's events come with
        ``event.forgotten`` set and blanks); messages that do not validate are skipped."""
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
    """What the worker does with one valid input (its state, for a stateful processor, folded up
    to the end of the log first): an input whose outputs are already on the log produces nothing
    more; otherwise the step runs. ``wait`` awaits a step that is a coroutine (the worker's keeps
    the message alive meanwhile)."""
    if processor.stateful and ctx.state.answered(event.id):
        return []  # a redelivery, however late: its outputs are on the log already
    result = processor.handle(event, ctx)
    if inspect.isawaitable(result):
        result = await (wait(result) if wait is not None else result)
    produced = list(result or ())
    unexpected = sorted({p.event_type for p in produced} - set(processor.produces)) if processor.produces else []
    if unexpected:
        raise TypeError(f"processor {processor.name!r} produced {unexpected}, which it does not declare in produces")
    return produced


def decided(event: Event[Any], ctx: ProcessContext) -> list[Payload]:
    """The handler of a processor whose fold decides (a pure policy): what the fold decided for the input."""
    return ctx.state.decision(event.id) or []


@dataclass(frozen=True)
class Processor(ConsumesEvents):
    """One step of the flywheel, consuming ``consumes`` on a durable consumer named ``name``.

    ``produces``: the event types it outputs (checked). ``stateful``: the engine keeps its state
    as a fold of the log (``flywheel_loop.engine.state``): ``tables`` is the SQL of its tables,
    ``fold(db, event, seq)`` applies the events of ``folds`` (default: ``consumes``) to them and may
    return the outputs an input causes (then ``handle=decided``); an input whose outputs are on the
    log is never handled again. Bump ``state_version`` when the tables or the fold change: the
    cache is folded again. ``on_start`` / ``on_stop`` (optional) bracket the worker's life.
    """

    name: str
    consumes: tuple[str, ...]
    handle: Handler
    description: str = ""
    batch: int | None = field(default=None, compare=False)
    produces: tuple[str, ...] = ()
    stateful: bool = False
    tables: str = ""
    fold: Folder | None = field(default=None, compare=False)
    folds: tuple[str, ...] = ()
    state_version: int = 1
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
        unknown = [t for t in (*self.produces, *self.folds) if t not in CATALOGUE]
        if unknown:
            raise ValueError(f"processor {self.name!r} names unknown event types {unknown}")
        if self.stateful and not self.produces:
            raise ValueError(f"stateful processor {self.name!r} must declare what it produces (exactly once)")
        if self.stateful:
            filter_subjects(tuple(dict.fromkeys((*(self.folds or self.consumes), *self.produces))))
