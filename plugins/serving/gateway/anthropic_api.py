"""The Anthropic side: Messages API requests translated to OpenAI chat requests, and answers translated back.

Upstreams speak OpenAI's chat completions, so ``POST /v1/messages`` is translated on the way in (``system``,
text and ``tool_use`` / ``tool_result`` blocks, ``tools`` and ``tool_choice``, ``stop_sequences``) and on the way
out: a whole answer becomes a ``message`` with ``text`` and ``tool_use`` blocks; a stream becomes Anthropic's
events (``message_start``, ``content_block_start`` / ``_delta`` / ``_stop``, ``message_delta`` with the stop reason
and usage, ``message_stop``). The message ``id`` is the interaction id. Errors have Anthropic's shape.
"""

from __future__ import annotations

from typing import Any

import orjson

from flywheel_loop.plugins.serving.gateway.openai_api import Answer, BadRequest, text_of

__all__ = ["StreamTranslator", "error_body", "message_from", "to_openai"]

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 413: "request_too_large", 422: "invalid_request_error", 429: "rate_limit_error",
          502: "api_error", 503: "overloaded_error", 504: "api_error"}

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use",
                "content_filter": "refusal"}


def error_body(status: int, message: str) -> bytes:
    """Anthropic's error shape: ``{"type": "error", "error": {"type", "message"}}``."""
    return orjson.dumps({"type": "error", "error": {"type": _TYPES.get(status, "api_error"), "message": message}})


def _blocks(content: Any, field: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise BadRequest(f"{field}: content must be a string or a list of content blocks", field)
    for i, block in enumerate(content):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise BadRequest(f"{field}.{i}: a content block is an object with a type", f"{field}.{i}")
    return content


def to_openai(body: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI chat request for an Anthropic Messages request (``BadRequest`` naming a bad field)."""
    messages: list[dict[str, Any]] = []
    system = body.get("system")
    if system is not None:
        text = text_of(system)
        if not isinstance(system, (str, list)):
            raise BadRequest("system: a string or a list of text blocks", "system")
        messages.append({"role": "system", "content": text})
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise BadRequest("messages: a non-empty list of {role, content} is required", "messages")
    for i, message in enumerate(raw):
        field = f"messages.{i}"
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise BadRequest(f"{field}.role: must be 'user' or 'assistant'", f"{field}.role")
        blocks = _blocks(message.get("content"), f"{field}.content")
        if message["role"] == "assistant":
            text = "".join(b.get("text", "") for b in blocks if b["type"] == "text")
            calls = [{"id": b.get("id", ""), "type": "function",
                      "function": {"name": b.get("name", ""), "arguments": orjson.dumps(b.get("input", {})).decode()}}
                     for b in blocks if b["type"] == "tool_use"]
            out: dict[str, Any] = {"role": "assistant", "content": text or None}
            if calls:
                out["tool_calls"] = calls
            messages.append(out)
            continue
        text_parts: list[str] = []
        for block in blocks:
            if block["type"] == "tool_result":
                result = block.get("content", "")
                messages.append({"role": "tool", "tool_call_id": block.get("tool_use_id", ""),
                                 "content": result if isinstance(result, str) else text_of(result)})
            elif block["type"] == "text":
                text_parts.append(str(block.get("text", "")))
        if text_parts:
            messages.append({"role": "user", "content": "".join(text_parts)})
    max_tokens = body.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise BadRequest("max_tokens: a positive integer is required", "max_tokens")
    out = {"model": body.get("model"), "messages": messages, "max_tokens": max_tokens}
    for key in ("temperature", "top_p"):
        if key in body:
            out[key] = body[key]
    if body.get("stop_sequences"):
        out["stop"] = body["stop_sequences"]
    if body.get("stream"):
        out["stream"] = True
    tools = body.get("tools")
    if isinstance(tools, list) and tools:
        out["tools"] = [{"type": "function", "function": {"name": t.get("name", ""),
                                                          "description": t.get("description", ""),
                                                          "parameters": t.get("input_schema", {})}}
                        for t in tools if isinstance(t, dict)]
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        kind = choice.get("type")
        if kind == "any":
            out["tool_choice"] = "required"
        elif kind == "tool":
            out["tool_choice"] = {"type": "function", "function": {"name": choice.get("name", "")}}
        elif kind in ("auto", "none"):
            out["tool_choice"] = kind
    return out


def _arguments(text: str) -> Any:
    try:
        return orjson.loads(text) if text else {}
    except orjson.JSONDecodeError:
        return {"_raw": text}  # an upstream that produced broken JSON: pass it on rather than lose it


def message_from(answer: Answer, message_id: str, model: str) -> dict[str, Any]:
    """The Anthropic ``message`` for a whole answer."""
    content: list[dict[str, Any]] = []
    if answer.output:
        content.append({"type": "text", "text": answer.output})
    for call in answer.calls():
        content.append({"type": "tool_use", "id": call["id"] or f"toolu_{len(content)}", "name": call["name"],
                        "input": _arguments(call["arguments"])})
    return {
        "id": message_id, "type": "message", "role": "assistant", "model": model, "content": content,
        "stop_reason": STOP_REASONS.get(answer.finish_reason or "stop", "end_turn"), "stop_sequence": None,
        "usage": {"input_tokens": answer.prompt_tokens, "output_tokens": answer.completion_tokens},
    }


def event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


class StreamTranslator:
    """OpenAI chunks in, Anthropic stream events out; ``answer`` folds what is recorded."""

    def __init__(self, message_id: str, model: str) -> None:
        self.message_id = message_id
        self.model = model
        self.answer = Answer()
        self.started = False
        self.index = -1
        self.open_kind: str | None = None  # "text" or "tool"
        self.open_tool: int | None = None

    def start(self) -> bytes:
        self.started = True
        message: dict[str, Any] = {"id": self.message_id, "type": "message", "role": "assistant", "model": self.model,
                   "content": [], "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": 0, "output_tokens": 0}}
        return event("message_start", {"type": "message_start", "message": message}) + event("ping", {"type": "ping"})

    def _close(self) -> bytes:
        if self.open_kind is None:
            return b""
        self.open_kind = None
        self.open_tool = None
        return event("content_block_stop", {"type": "content_block_stop", "index": self.index})

    def chunk(self, body: dict[str, Any]) -> bytes:
        out = b"" if self.started else self.start()
        before_calls = {i: dict(c) for i, c in self.answer.tool_calls.items()}
        before_text = len(self.answer.text)
        self.answer.chunk(body, chat=True)
        for piece in self.answer.text[before_text:]:
            if not piece:
                continue
            if self.open_kind != "text":
                out += self._close()
                self.index += 1
                self.open_kind = "text"
                out += event("content_block_start", {"type": "content_block_start", "index": self.index,
                                                     "content_block": {"type": "text", "text": ""}})
            out += event("content_block_delta", {"type": "content_block_delta", "index": self.index,
                                                 "delta": {"type": "text_delta", "text": piece}})
        for i, call in sorted(self.answer.tool_calls.items()):
            seen = before_calls.get(i)
            if self.open_tool != i and (seen is None or seen != call):
                out += self._close()
                self.index += 1
                self.open_kind, self.open_tool = "tool", i
                out += event("content_block_start", {
                    "type": "content_block_start", "index": self.index,
                    "content_block": {"type": "tool_use", "id": call["id"] or f"toolu_{i}", "name": call["name"],
                                      "input": {}}})
                seen = {"arguments": ""}
            added = call["arguments"][len(seen["arguments"]) if seen else 0:]
            if added:
                out += event("content_block_delta", {"type": "content_block_delta", "index": self.index,
                                                     "delta": {"type": "input_json_delta", "partial_json": added}})
        return out

    def finish(self) -> bytes:
        out = (b"" if self.started else self.start()) + self._close()
        stop = STOP_REASONS.get(self.answer.finish_reason or "stop", "end_turn")
        out += event("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                                       "usage": {"input_tokens": self.answer.prompt_tokens,
                                                 "output_tokens": self.answer.completion_tokens}})
        return out + event("message_stop", {"type": "message_stop"})

    def error(self, status: int, message: str) -> bytes:
        """A failure after the stream began: Anthropic's ``error`` event."""
        return event("error", orjson.loads(error_body(status, message)))
