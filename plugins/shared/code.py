"""Reading code out of a model's answer, and the license-header convention.

- ``extract_code``: the Python a chat answer holds (its fenced blocks, or the whole answer);
- ``follows_convention`` / ``header_line``: the SPDX license-header convention
  (``# SPDX-License-Identifier: <license>`` on the first non-blank line), which the scoring
  feature's ``convention`` assessor scores and the demo's reviewer enforces.
"""

from __future__ import annotations

import re

__all__ = ["HEADER", "extract_code", "follows_convention", "header_line"]

_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)


def extract_code(answer: str) -> str:
    """The code in a model's answer: its fenced code blocks joined (```python ... ```), or the
    whole answer when it has none."""
    blocks = [m.group(1).strip("\n") for m in _FENCE.finditer(answer)]
    return "\n\n".join(b for b in blocks if b.strip()) + "\n" if blocks else answer


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
