"""The OpenAI side: request reading, error bodies, and rewriting answers and their server-sent event chunks.

The gateway forwards OpenAI requests as they are (tools, tool results, sampling parameters unchanged), with two
edits: ``model`` becomes the name the upstream serves, and a streamed request asks the upstream for its usage
(``stream_options.include_usage``) so tokens are recorded; that last chunk is passed on only when the client
asked for it. Each answer, whole or chunk by chunk, gets the interaction id as its ``id`` (what feedback is
posted against) and the served version as its ``model``; ``Answer`` keeps what is recorded: the text (a streamed
one reassembled), tool calls, tokens, finish reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

__all__ = ["Answer", "BadRequest", "error_body", "prompt_of", "text_of"]


class BadRequest(ValueError):
    """A request the gateway refuses before forwarding it (400 or 413); ``param`` names the field."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status


_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 413: "request_too_large", 422: "invalid_request_error"}


def error_body(status: int, message: str, param: str | None = None) -> bytes:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    kind = _TYPES.get(status, "upstream_error" if status in (502, 503, 504) else "server_error")
    return orjson.dumps({"error": {"message": message, "type": kind, "param": param, "code": status}})


def text_of(content: Any) -> str:
    """The text of a message's content: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def prompt_of(messages: list[Any]) -> str:
    """What is recorded as the interaction's input: the last user message (earlier turns go to the context)."""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return text_of(message.get("content"))
    return ""


def parse_json(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object, or ``BadRequest`` saying why not."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


def require_model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("model: a model name (a role such as 'coder', a version or an upstream) is required", "model")
    return model


@dataclass
class Answer:
    """What came back, folded from a whole answer or from its chunks."""

    text: list[str] = field(default_factory=list)
    #: index -> {"id", "name", "arguments"}
    tool_calls: dict[int, dict[str, str]] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None

    @property
    def output(self) -> str:
        return "".join(self.text)

    def calls(self) -> list[dict[str, str]]:
        return [self.tool_calls[i] for i in sorted(self.tool_calls)]

    def usage(self, usage: Any) -> None:
        if isinstance(usage, dict):
            self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            self.completion_tokens = int(usage.get("completion_tokens") or 0)

    def tool_delta(self, deltas: Any) -> None:
        """Fold tool-call deltas (streamed: name first, arguments in pieces, matched by ``index``)."""
        if not isinstance(deltas, list):
            return
        for i, delta in enumerate(deltas):
            if not isinstance(delta, dict):
                continue
            index = delta.get("index", i)
            call = self.tool_calls.setdefault(index if isinstance(index, int) else i,
                                              {"id": "", "name": "", "arguments": ""})
            if isinstance(delta.get("id"), str):
                call["id"] = delta["id"]
            function = delta.get("function")
            if isinstance(function, dict):
                if isinstance(function.get("name"), str):
                    call["name"] += function["name"]
                if isinstance(function.get("arguments"), str):
                    call["arguments"] += function["arguments"]

    def whole(self, body: dict[str, Any], chat: bool) -> None:
        """Fold a non-streamed answer."""
        choices = body.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            choice = choices[0]
            if chat:
                message = choice.get("message") or {}
                self.text.append(text_of(message.get("content")))
                self.tool_delta(message.get("tool_calls"))
            else:
                self.text.append(str(choice.get("text") or ""))
            self.finish_reason = choice.get("finish_reason")
        self.usage(body.get("usage"))

    def chunk(self, body: dict[str, Any], chat: bool) -> None:
        """Fold one streamed chunk."""
        choices = body.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            choice = choices[0]
            if chat:
                delta = choice.get("delta") or {}
                content = delta.get("content")
                if isinstance(content, str):
                    self.text.append(content)
                self.tool_delta(delta.get("tool_calls"))
            else:
                text = choice.get("text")
                if isinstance(text, str):
                    self.text.append(text)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        if body.get("usage"):
            self.usage(body["usage"])


def sse(data: bytes) -> bytes:
    return b"data: " + data + b"\n\n"


DONE = b"data: [DONE]\n\n"


def upstream_request(body: dict[str, Any], upstream_model: str, system: str | None) -> tuple[bytes, bool]:
    """The body forwarded upstream and whether the client asked for streamed usage."""
    out = dict(body)
    out["model"] = upstream_model
    wants_usage = False
    if out.get("stream"):
        options = out.get("stream_options")
        wants_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        out["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    if system is not None and isinstance(out.get("messages"), list):
        out["messages"] = [{"role": "system", "content": system}, *out["messages"]]
    return orjson.dumps(out), wants_usage
