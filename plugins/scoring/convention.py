"""Built-in assessor ``convention``: does a Python answer follow the license-header convention?

The convention: every Python file a coding agent writes starts with an SPDX license header,
``# SPDX-License-Identifier: <license>`` (e.g. ``Apache-2.0``), on its first non-blank line. It
is a real and common project rule (the Linux kernel, Zephyr and many companies require it), it is
checkable by a function, and a small model does not follow it on its own, which makes it a clear
thing for corrections to teach (``flywheel demo`` measures exactly that).

The assessor scores one dimension, ``header``: 1 when the code of the answer (its fenced code
blocks if it has any, else the whole answer: ``plugins/shared/code.py``) starts with the
header, 0 when it does not. It answers only for Python interactions (``context.language`` or
``domain`` says python, or the answer has a python code fence, or the interaction's tests are
Python); for anything else it returns None. Like any assessor it moves the reward only when
``assessment.assessor_weights`` gives it a weight;
unweighted it is recorded in ``quality.assessed`` as ``convention.header``.
"""

from __future__ import annotations

import re

from flywheel_loop.engine.assessment import Assessment, Assessor, Evidence
from flywheel_loop.plugins.shared.code import extract_code, follows_convention
from flywheel_loop.schemas import InteractionAnonymized

__all__ = ["ASSESSOR", "assess"]

_PYTHON_FENCE = re.compile(r"```[ \t]*(?:python3?|py)\b", re.I)

VERSION = "1.0.0"


def _is_python(interaction: InteractionAnonymized) -> bool:
    rec = interaction.interaction
    said = {(rec.context.language or "").lower(), (rec.domain or "").lower()}
    if "python" in said:
        return True
    if _PYTHON_FENCE.search(rec.output):
        return True
    tests = rec.context.tests or ""
    return "def test" in tests or "assert " in tests


def assess(evidence: Evidence) -> Assessment | None:
    interaction = evidence.interaction
    if not _is_python(interaction):
        return None
    code = extract_code(interaction.interaction.output)
    return Assessment(scores={"header": 1.0 if follows_convention(code) else 0.0}, version=VERSION)


ASSESSOR = Assessor("convention", assess, VERSION)
