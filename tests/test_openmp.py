"""``torch_threads`` gives back its thread's OpenMP workers when its block ends (``plugins/shared/openmp.py``):
a pool left on an idle thread makes libgomp put the threads of every later parallel loop to sleep at each
barrier once the pools outnumber the CPUs (measured: the demo's training at half speed)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from flywheel_loop.plugins.shared.openmp import _loaded_libgomps

# each case in a fresh process: how many OS threads a finished torch job leaves behind on its (still running)
# thread; "sklearn" imports scikit-learn first, which loads a libgomp copy of its own (as sentence-transformers
# does in the engine)
PROBE = """
import os, sys, threading, time
if "sklearn" in sys.argv:
    import sklearn.metrics
import torch
from flywheel_loop.plugins.shared.models import torch_threads

def tasks():
    return len(os.listdir("/proc/self/task"))

def settled(before):
    # a joined thread can stay listed for a moment: wait (briefly) for the count to come back
    deadline = time.monotonic() + 5
    while tasks() > before and time.monotonic() < deadline:
        time.sleep(0.02)
    return tasks() - before

left, done = [], threading.Event()

def job(block):
    x = torch.randn(1_000_000)
    before = tasks()
    if block:
        with torch_threads(2):
            x.exp_()  # a parallel loop: two OpenMP threads
    else:
        torch.set_num_threads(2)
        x.exp_()
    left.append(settled(before))
    done.wait()  # the thread stays alive, as an executor's worker does

with torch_threads(2):  # whatever torch starts once per process is started before the count
    torch.randn(1_000_000).exp_()
thread = threading.Thread(target=job, args=(sys.argv[1] == "block",), daemon=True)
thread.start()
while not left:
    time.sleep(0.05)
print(left[0])
"""


def _left_behind(*case: str) -> int:
    run = subprocess.run([sys.executable, "-c", PROBE, *case], capture_output=True, text=True, timeout=120,
                         check=True)
    return int(run.stdout.split()[-1])


def test_a_torch_threads_block_leaves_no_openmp_worker_on_its_thread() -> None:
    import torch  # noqa: F401  (loads torch's OpenMP runtime in this process, for the check below)

    if not _loaded_libgomps():
        pytest.skip("torch runs on no GNU OpenMP runtime here")
    assert _left_behind("bare") >= 1  # without the block the pool stays: what the release is for
    assert _left_behind("block") == 0
    # with another package's libgomp loaded first (it sorts before torch's), torch's pool is still freed
    assert _left_behind("block", "sklearn") == 0
