"""Reading code out of a model's answer, and the license-header convention.

- ``extract_code``: the Python a chat answer holds (its fenced blocks, or the whole answer);
- ``in_answer_form``: a reviewer's bare-code correction fenced like the answer it corrects;
- ``follows_convention`` / ``header_line``: the SPDX license-header convention
  (``# SPDX-License-Identifier: <license>`` on the first non-blank line), which the scoring
  feature's ``convention`` assessor scores and the demo's reviewer enforces.
"""

from __future__ import annotations

import ast
import re

__all__ = ["HEADER", "extract_code", "follows_convention", "header_line", "in_answer_form"]

_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)


def extract_code(answer: str) -> str:
    """The code in a model's answer: its fenced code blocks joined (```python ... ```), or the
    whole answer when it has none."""
    blocks = [m.group(1).strip("\n") for m in _FENCE.finditer(answer)]
    return "\n\n".join(b for b in blocks if b.strip()) + "\n" if blocks else answer


#: a fence line: ``` and the block's language tag, if any (captured)
_FENCE_LINE = re.compile(r"^[ \t]*```[ \t]*([\w+#.-]*)[ \t]*$", re.MULTILINE)


def _python_opening_tag(answer: str) -> str | None:
    """The tag of the first fenced block of ``answer`` that is Python or unnamed ("" for unnamed), None when it
    has none; fence lines alternate between opening and closing a block."""
    inside = False
    for match in _FENCE_LINE.finditer(answer):
        if not inside and match.group(1).lower() in ("", "python", "python3", "py"):
            return match.group(1)
        inside = not inside
    return None


def in_answer_form(correction: str, answer: str) -> str:
    """``correction`` in the form of the ``answer`` it corrects. A reviewer's correction is often the
    file's text (bare code) while the model answers in Markdown with its code in a fenced block; learning
    the bare text would teach the model to drop its answer format as well as fix the code, on every prompt
    (a DPO pair would prefer the format, not the fix). So a correction that is Python (it parses, to more
    than bare expressions) and holds no fence is put in a block fenced as the answer's first Python block
    was (same tag); anything else (prose, a fenced correction, an answer without a Python block) is kept
    as given."""
    if "```" in correction:
        return correction
    tag = _python_opening_tag(answer)
    if tag is None:
        return correction
    try:
        body = ast.parse(correction).body
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # prose, another language, or too deep to parse
        return correction
    if all(isinstance(node, ast.Expr) for node in body):  # a word or two of prose parses as an expression
        return correction
    return f"```{tag}\n{correction.strip(chr(10))}\n```"


#: the header line the convention asks for, with the license id captured
HEADER = re.compile(r"^#\s*SPDX-License-Identifier:\s*(\S+)\s*$")
_PYTHON_FENCE = re.compile(r"```[ \t]*(?:python3?|py)\b", re.I)


def header_line(license_id: str) -> str:
    """The header line for ``license_id``, e.g. ``# SPDX-License-Identifier: Apache-2.0``."""
    if not license_id or any(c.isspace() for c in license_id):
        raise ValueError(f"an SPDX license id is one word such as Apache-2.0, got {license_id!r}")
    return f"# SPDX-License-Identifier: {license_id}"


def follows_convention(code: str, license_id: str | None = None) -> bool:
    """Whether the first non-blank line of ``code`` is an SPDX header (for ``license_id`` if given)."""
    for line in code.splitlines():
        if line.strip():
            match = HEADER.match(line.strip())
            return match is not None and (license_id is None or match.group(1) == license_id)
    return False
