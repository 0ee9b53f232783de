"""The one request Flywheel's own code sends to an OpenAI-compatible server: a chat completion
for a single user message. Standard library only. ``urllib`` errors reach the caller, which says
what they mean for it (a runtime's smoke test, the demo's agent)."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

__all__ = ["post_chat"]


def post_chat(base_url: str, model_name: str, prompt: str, max_tokens: int, temperature: float,
              timeout_s: float) -> dict[str, Any]:
    """The ``/chat/completions`` answer of the server at ``base_url`` (``.../v1``) to one user message."""
    body = {
        "model": model_name,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": temperature,
    }
    request = urllib.request.Request(
        f"{base_url}/chat/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        answer: dict[str, Any] = json.loads(response.read())
    return answer
