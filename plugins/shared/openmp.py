"""Give back a thread's OpenMP workers when its torch work is done.

torch's CPU wheels for Linux run their parallel loops on GNU OpenMP (``libgomp``), which keeps a pool
of worker threads per thread that ever ran a parallel loop, for as long as that thread lives. The
engine runs torch work on ``asyncio.to_thread`` workers that never exit (generation, rehearsal,
embedding, evaluation, training: whichever worker is free), so after a while the process holds
several pools. libgomp counts every thread of every pool, and once they outnumber the CPUs it stops
busy-waiting at the barriers of a parallel loop and puts the threads to sleep instead (its
"throttled" spin count), on every barrier of every loop, including those of the one job still
running. Measured on a 2-core CPU: the demo's training ran at 54 tokens/s with two idle pools in
the process and at 101 tokens/s without (the same loop, the same data; ``GOMP_SPINCOUNT`` does not
change the throttled count).

``release_pool()`` frees the calling thread's pool (OpenMP 5's ``omp_pause_resource_all`` with
``omp_pause_soft``, which in libgomp joins the workers of the calling thread's pool and of no other, and
lowers the process-wide count of managed threads) in every libgomp copy the process has loaded; the next
parallel loop of that thread starts a new pool. ``torch_threads`` calls it when its block ends.
Elsewhere (LLVM's or Intel's OpenMP, macOS, no OpenMP loaded) it does nothing: their pause acts on
the whole process.
"""

from __future__ import annotations

import ctypes
import sys
from typing import Any

__all__ = ["release_pool"]

#: ``omp_pause_soft`` of OpenMP 5.0's ``omp_pause_resource_t``
_PAUSE_SOFT = 1


#: the pause function of each libgomp copy found so far, by path (None: one without OpenMP 5's pause)
_PAUSES: dict[str, Any] = {}
#: how many modules were imported when /proc/self/maps was last read
_SCANNED_AT = -1


def _loaded_libgomps() -> list[str]:
    """The paths of the GNU OpenMP runtimes this process has loaded: torch's own copy, and others that came
    with other packages (scikit-learn ships one, loaded by sentence-transformers' import of it)."""
    if not sys.platform.startswith("linux"):
        return []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            paths = {line.split(None, 5)[-1].strip() for line in maps if "libgomp" in line}
    except OSError:
        return []
    return sorted(p for p in paths if p.startswith("/"))


def _pause_of(path: str) -> Any | None:
    try:
        pause = ctypes.CDLL(path).omp_pause_resource_all  # already loaded: the same handle, nothing loaded twice
    except (OSError, AttributeError):  # an older libgomp without OpenMP 5's pause
        return None
    pause.argtypes = [ctypes.c_int]
    pause.restype = ctypes.c_int
    return pause


def _pauses() -> list[Any]:
    """The pause function of every libgomp copy loaded. The memory map costs about 3 ms to read (1,400 lines in
    an engine process) and ``torch_threads`` blocks run per served request and per embedding batch, so it is read
    again only after an import: a library that brings its own libgomp is loaded by importing a module."""
    global _SCANNED_AT
    if len(sys.modules) != _SCANNED_AT:
        _SCANNED_AT = len(sys.modules)  # before reading: a module imported meanwhile is looked for next time
        for path in _loaded_libgomps():
            if path not in _PAUSES:
                _PAUSES[path] = _pause_of(path)
    return [pause for pause in _PAUSES.values() if pause is not None]


def release_pool() -> bool:
    """Free the calling thread's OpenMP worker pool in every GNU OpenMP runtime loaded (each copy keeps its own
    pools); True when at least one was asked and agreed. Call it outside any parallel region (libgomp refuses
    inside one, and nothing is freed)."""
    released = False
    for pause in _pauses():
        if pause(_PAUSE_SOFT) == 0:
            released = True
    return released
