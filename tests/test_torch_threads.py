"""``torch_threads`` (``plugins/shared/models.py``): a block without a count runs with the process's
default, whatever count its thread inherited."""

from __future__ import annotations

import threading

import torch

from flywheel_loop.plugins.shared.models import default_threads, torch_threads


def test_a_block_without_a_count_runs_with_the_default_whatever_its_thread_inherited() -> None:
    default = default_threads()
    seen: list[int] = []

    def worker() -> None:
        torch.set_num_threads(default + 1)  # a count left to this thread by another's block
        with torch_threads(None):
            seen.append(torch.get_num_threads())
            with torch_threads(1):
                seen.append(torch.get_num_threads())
            seen.append(torch.get_num_threads())
        seen.append(torch.get_num_threads())  # what the block found comes back

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(30)
    assert seen == [default, 1, default, default + 1]
