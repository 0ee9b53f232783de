"""``torch_threads`` (``plugins/shared/models.py``): a block without a count runs with the machine's default,
whatever count its thread inherited."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest
import torch

from flywheel_loop.plugins.shared.models import default_threads, torch_threads


@pytest.fixture(autouse=True)
def restore() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)  # also what threads started later in this process inherit


def test_a_block_without_a_count_runs_with_the_default_whatever_its_thread_inherited() -> None:
    default = default_threads()
    seen: list[int] = []

    def worker() -> None:
        try:
            torch.set_num_threads(default + 1)  # a count left to this thread by another's block
            with torch_threads(None):
                seen.append(torch.get_num_threads())
                with torch_threads(1):
                    seen.append(torch.get_num_threads())
                seen.append(torch.get_num_threads())
            seen.append(torch.get_num_threads())  # what the block found comes back
        finally:
            torch.set_num_threads(default)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(30)
    assert seen == [default, 1, default, default + 1]


def test_the_default_is_torchs_own_count_in_a_fresh_process(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    code = ("import torch; from flywheel_loop.plugins.shared.models import default_threads;"
            " print(torch.get_num_threads(), default_threads())")
    torch_count, ours = map(int, subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                                text=True, check=True, timeout=120).stdout.split())
    usable = len(os.sched_getaffinity(0))
    assert ours == min(torch_count, usable)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # as torch reads it
    assert default_threads() == 3
