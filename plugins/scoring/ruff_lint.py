"""Optional assessor: ruff's findings per line on the Python code in the answer.

Off by default (listed in ``assessment.disabled``): ruff runs as a subprocess, 4-5 ms
median and 7-8 ms p99 a call on the development machine (``bash ops/bench/assess --json``
prints ``ruff_p50_ms`` and ``ruff_p99_ms``), over the 5 ms budget of the built-ins.
Enable it by removing it from ``assessment.disabled``; its budget is
``assessment.budgets_ms.ruff_lint`` (500 ms), and give it a share in
``assessment.assessor_weights`` if it should move the reward.

One dimension, ``lint``: 1 / (1 + 5 x findings per line), like ``quality_dimensions``'s
``ast`` checks but with ruff's default rule set. A missing ruff binary means no opinion.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import orjson

from flywheel_loop.engine.assessment import Assessment, Assessor, Evidence
from flywheel_loop.plugins.scoring.quality_dimensions import lint_score, python_code

VERSION = "1.0.0"
TIMEOUT_S = 5.0


@cache
def ruff_binary() -> str | None:
    """ruff next to this interpreter (the venv), else on PATH."""
    beside = Path(sys.executable).parent / "ruff"
    return str(beside) if beside.is_file() else shutil.which("ruff")


def ruff_findings(source: str) -> int | None:
    """How many findings ruff reports on ``source`` (default rules, no config), or None."""
    binary = ruff_binary()
    if binary is None:
        return None
    args = [
        binary,
        "check",
        "--isolated",
        "--no-cache",
        "--output-format",
        "json",
        "--stdin-filename",
        "answer.py",
        "-",
    ]
    done = subprocess.run(args, input=source.encode(), capture_output=True, timeout=TIMEOUT_S, check=False)
    if done.returncode not in (0, 1):  # 0: clean, 1: findings; anything else is ruff failing
        raise RuntimeError(f"ruff exited {done.returncode}: {done.stderr.decode(errors='replace')[:200]}")
    return len(orjson.loads(done.stdout or b"[]"))


def assess(evidence: Evidence) -> Assessment | None:
    interaction = evidence.interaction
    blocks = python_code(interaction.interaction)
    if not blocks:
        return None
    scores = []
    for block in blocks:
        found = ruff_findings(block)
        if found is None:
            return None
        scores.append(lint_score(found, block))
    return Assessment(scores={"lint": sum(scores) / len(scores)}, version=VERSION)


ASSESSOR = Assessor("ruff_lint", assess, VERSION)
