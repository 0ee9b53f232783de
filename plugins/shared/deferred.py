"""A processor's handler whose module is imported on its first input, not when the processor is registered.

Every ``flywheel up`` registers every plugin's processors, also one started with ``--only`` for other
steps; the trainer's and the evaluator's modules bring in torch and transformers (a second or more of
start-up, and the memory), which a process that never trains or evaluates need not pay for.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from flywheel_loop.engine.processor import Handler, Outputs, ProcessContext

__all__ = ["Deferred"]


class Deferred:
    """A handler made by ``load()`` the first time an input comes; then that handler, as it is."""

    def __init__(self, load: Callable[[], Handler]) -> None:
        self._load = load
        self._handle: Handler | None = None

    async def __call__(self, event: Any, ctx: ProcessContext) -> Outputs:
        if self._handle is None:
            self._handle = self._load()
        result = self._handle(event, ctx)
        if inspect.isawaitable(result):
            return await result
        return result
