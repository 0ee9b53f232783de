"""Write the JSON Schema of every event type into ``schemas/json/``.

Run ``python -m schemas.export`` after changing a payload; a test fails while the files
are stale.
"""

from __future__ import annotations

import sys
from pathlib import Path

import orjson

from flywheel_loop.schemas import CATALOGUE, json_schema

JSON_DIR = Path(__file__).parent / "json"


def rendered() -> dict[str, bytes]:
    """File name -> the bytes it should hold."""
    return {
        f"{t}.json": orjson.dumps(json_schema(t), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
        + b"\n"
        for t in sorted(CATALOGUE)
    }


def main() -> int:
    JSON_DIR.mkdir(exist_ok=True)
    for name, body in rendered().items():
        (JSON_DIR / name).write_bytes(body)
    print(f"wrote {len(CATALOGUE)} schemas to {JSON_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
