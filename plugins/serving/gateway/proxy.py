"""Forwarding one call: refuse what is bad, route, forward, rewrite the answer, record the call.

A refused request (bad JSON, unknown model, no key, oversized body) gets the API's own error and is not an
interaction: nothing is recorded or published. Once a request is forwarded, the call is recorded whatever
happens: answered, refused by the upstream, or failed (upstream unreachable, broken off mid-stream), with the
served version, the upstream, the tokens, the latency and the time to first token. The record is built after the
answer has left (a background task of the response, or the end of the stream).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from flywheel_loop.plugins.serving.gateway import anthropic_api
from flywheel_loop.plugins.serving.gateway.access import Caller, Denied
from flywheel_loop.plugins.serving.gateway.openai_api import (
    DONE,
    Answer,
    BadRequest,
    error_body,
    parse_json,
    prompt_of,
    require_model,
    sse,
    text_of,
    upstream_request,
)
from flywheel_loop.plugins.serving.gateway.recording import ABOUT_HEADERS, Call
from flywheel_loop.plugins.serving.gateway.routing import NoUpstream, Target, UnknownModel
from flywheel_loop.plugins.serving.gateway.upstream import UpstreamError, describe

if TYPE_CHECKING:
    from flywheel_loop.plugins.serving.gateway.service import Gateway

__all__ = ["anthropic_messages", "openai_call", "read_body"]

JSON = "application/json"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past ``limit`` bytes (checked before and while reading)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadRequest(f"the request body is {declared} bytes; the limit is {limit} (gateway.max_body_bytes)",
                         status=413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(f"the request body is over {limit} bytes (gateway.max_body_bytes)", status=413)
        chunks.append(chunk)
    return b"".join(chunks)


def _status_of(exc: Exception) -> int:
    if isinstance(exc, BadRequest):
        return exc.status
    if isinstance(exc, Denied):
        return exc.status
    if isinstance(exc, UnknownModel):
        return 404
    return 503  # NoUpstream


def _message_of(exc: Exception) -> str:
    return exc.message if isinstance(exc, (BadRequest, Denied)) else str(exc)


def _headers(call: Call) -> dict[str, str]:
    return {"x-flywheel-interaction-id": call.id, "x-flywheel-version": call.target.served_version}


class EventStream(Response):
    """A server-sent event stream relayed as it arrives.

    Starlette's ``StreamingResponse`` watches for a client that goes away with a task group of two tasks per
    response (uvicorn does not announce ASGI 2.4); one pending ``receive()`` does the same job for less, which is
    most of the time to first token the gateway adds.
    """

    media_type = "text/event-stream"

    def __init__(self, chunks: AsyncIterator[bytes], headers: dict[str, str]) -> None:
        self.chunks = chunks
        self.status_code = 200
        self.background = None
        self.init_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        gone = asyncio.ensure_future(receive())  # the body is read: the next message is http.disconnect
        try:
            async for chunk in self.chunks:
                if gone.done():
                    break  # the client left: stop relaying (the call is recorded as such)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            else:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            gone.cancel()
            await self.chunks.aclose()  # type: ignore[attr-defined]


class _Errors:
    """How one API writes errors."""

    def __init__(self, anthropic: bool) -> None:
        self.anthropic = anthropic

    def response(self, status: int, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None, background: BackgroundTask | None = None) -> Response:
        body = anthropic_api.error_body(status, message) if self.anthropic else error_body(status, message, param)
        return Response(body, status_code=status, media_type=JSON, headers=headers, background=background)

    def refused(self, exc: Exception) -> Response:
        return self.response(_status_of(exc), _message_of(exc), getattr(exc, "param", None))


def _failed(call: Call, status: int, message: str) -> None:
    call.status, call.http_status, call.error = "failed", status, message


def _upstream_refusal(call: Call, status: int, body: bytes) -> str:
    """An upstream that answered with an error: what it said, naming it."""
    try:
        parsed = orjson.loads(body)
        detail = parsed.get("error", {}).get("message") if isinstance(parsed, dict) else None
    except (orjson.JSONDecodeError, AttributeError):
        detail = None
    detail = detail or body[:500].decode(errors="replace")
    message = f"{describe(call.target)} answered {status}: {detail}"
    _failed(call, status, message)
    return message


async def _begin(gw: Gateway, request: Request, api: str) -> tuple[Caller, dict[str, Any], str, str]:
    """Key, body, model and session of a request (refusals raise)."""
    caller = gw.access.caller(request.headers)
    body = parse_json(await read_body(request, gw.cfg.max_body_bytes))
    model = require_model(body)
    return caller, body, model, gw.session_of(request.headers, body, api)


def _route(gw: Gateway, caller: Caller, model: str, session: str) -> tuple[Target, str | None]:
    target, variant = gw.route(model, session)
    if not caller.may_call(target.role):
        raise Denied(403, f"this key may not call role {target.role!r}")
    return target, variant


# --------------------------------------------------------------------------- OpenAI


async def openai_call(gw: Gateway, request: Request, chat: bool) -> Response:
    """``POST /v1/chat/completions`` (``chat``) or ``POST /v1/completions``."""
    api = "openai.chat" if chat else "openai.completions"
    errors = _Errors(anthropic=False)
    try:
        caller, body, model, session = await _begin(gw, request, api)
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise BadRequest("messages: a non-empty list of messages is required", "messages")
            prompt = prompt_of(messages)
        else:
            raw_prompt = body.get("prompt")
            if not isinstance(raw_prompt, (str, list)):
                raise BadRequest("prompt: a string is required", "prompt")
            prompt = raw_prompt if isinstance(raw_prompt, str) else text_of(raw_prompt)
        target, variant = _route(gw, caller, model, session)
    except (BadRequest, Denied, UnknownModel, NoUpstream) as exc:
        return errors.refused(exc)
    context = _context(body) if chat else None
    call = Call(api, target, session, caller.key, bool(body.get("stream")), prompt, context,
                user=body.get("user") if isinstance(body.get("user"), str) else None, prompt_variant=variant)
    call.about = _about(request)
    recorded = gw.recording.begin(call)
    system = gw.cfg.prompt_texts.get(variant) if variant else None
    upstream_body, wants_usage = upstream_request(body, target.upstream_model, system if chat else None)
    finish = _finisher(gw, call, recorded)
    path = "/chat/completions" if chat else "/completions"
    if not call.stream:
        return await _whole(gw, call, path, upstream_body, errors, finish, chat)
    return await _streamed(gw, call, path, upstream_body, errors, finish,
                           _OpenAIChunks(call, chat, wants_usage))


def _about(request: Request) -> dict[str, str]:
    """What the agent says about its task in ``x-flywheel-*`` headers (the language a convention assessor needs,
    the domain and complexity curation balances on); nothing is required."""
    headers = request.headers
    return {name: value for header, name in ABOUT_HEADERS.items() if (value := headers.get(header))}


def _context(body: dict[str, Any]) -> dict[str, Any] | None:
    """What the recorded input leaves out: earlier turns, system prompts, tool results, the tools offered."""
    messages = body.get("messages") or []
    extra: dict[str, Any] = {}
    if len(messages) > 1:
        extra["messages"] = messages
    if body.get("tools"):
        extra["tools"] = body["tools"]
    return extra or None


def _finisher(gw: Gateway, call: Call, recorded: bool) -> Callable[[], Awaitable[None]]:
    # async on purpose: Starlette runs a plain function given as a background task on a worker thread, and that
    # hand-off cost more than building the record
    async def finish() -> None:
        if recorded:
            gw.recording.finish(call)

    return finish


def _fill(call: Call, answer: Answer) -> None:
    call.output = answer.output
    call.tool_calls = answer.calls()
    call.prompt_tokens, call.completion_tokens = answer.prompt_tokens, answer.completion_tokens


async def _whole(gw: Gateway, call: Call, path: str, upstream_body: bytes, errors: _Errors,
                 finish: Callable[[], Awaitable[None]], chat: bool, anthropic: bool = False) -> Response:
    headers = _headers(call)
    try:
        async with gw.upstreams.post(call.target, path, upstream_body) as reply:
            data = await reply.body()
            status = reply.status
    except UpstreamError as exc:
        _failed(call, exc.status, exc.message)
        return errors.response(exc.status, exc.message, headers=headers, background=BackgroundTask(finish))
    if status != 200:
        message = _upstream_refusal(call, status, data)
        code = status if 400 <= status < 600 else 502
        return errors.response(code, message, headers=headers, background=BackgroundTask(finish))
    try:
        parsed = orjson.loads(data)
        if not isinstance(parsed, dict):
            raise TypeError("not an object")
    except (orjson.JSONDecodeError, TypeError):
        message = f"{describe(call.target)} answered with something that is not a JSON object"
        _failed(call, 502, message)
        return errors.response(502, message, headers=headers, background=BackgroundTask(finish))
    answer = Answer()
    answer.whole(parsed, chat)
    _fill(call, answer)
    call.http_status = 200
    if anthropic:
        out = anthropic_api.message_from(answer, call.id, call.target.served_version)
    else:
        parsed["id"] = call.id
        parsed["model"] = call.target.served_version
        out = parsed
    return Response(orjson.dumps(out), media_type=JSON, headers=headers, background=BackgroundTask(finish))


class _Chunks:
    """Turns upstream chunks into what the client receives (per API)."""

    answer: Answer

    def chunk(self, body: dict[str, Any]) -> bytes:
        raise NotImplementedError

    def done(self) -> bytes:
        raise NotImplementedError

    def error(self, status: int, message: str) -> bytes:
        raise NotImplementedError


class _OpenAIChunks(_Chunks):
    def __init__(self, call: Call, chat: bool, wants_usage: bool) -> None:
        self.call, self.chat, self.wants_usage = call, chat, wants_usage
        self.answer = Answer()

    def chunk(self, body: dict[str, Any]) -> bytes:
        self.answer.chunk(body, self.chat)
        if not body.get("choices") and body.get("usage") and not self.wants_usage:
            return b""  # the usage the gateway asked for on its own account
        body["id"] = self.call.id
        body["model"] = self.call.target.served_version
        return sse(orjson.dumps(body))

    def done(self) -> bytes:
        return DONE

    def error(self, status: int, message: str) -> bytes:
        return sse(error_body(status, message))


class _AnthropicChunks(_Chunks):
    def __init__(self, call: Call) -> None:
        self.translator = anthropic_api.StreamTranslator(call.id, call.target.served_version)
        self.answer = self.translator.answer

    def chunk(self, body: dict[str, Any]) -> bytes:
        return self.translator.chunk(body)

    def done(self) -> bytes:
        return self.translator.finish()

    def error(self, status: int, message: str) -> bytes:
        return self.translator.error(status, message)


async def _streamed(gw: Gateway, call: Call, path: str, upstream_body: bytes, errors: _Errors,
                    finish: Callable[[], Awaitable[None]], chunks: _Chunks) -> Response:
    headers = _headers(call)
    stack = contextlib.AsyncExitStack()
    try:
        reply = await stack.enter_async_context(gw.upstreams.post(call.target, path, upstream_body))
    except UpstreamError as exc:
        _failed(call, exc.status, exc.message)
        return errors.response(exc.status, exc.message, headers=headers, background=BackgroundTask(finish))
    if reply.status != 200:
        try:
            data = await reply.body()
        except (aiohttp.ClientError, TimeoutError):
            data = b""
        await stack.aclose()
        message = _upstream_refusal(call, reply.status, data)
        code = reply.status if 400 <= reply.status < 600 else 502
        return errors.response(code, message, headers=headers, background=BackgroundTask(finish))

    async def relay() -> AsyncIterator[bytes]:
        completed = False
        try:
            async for line in reply.lines():
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    break
                try:
                    body = orjson.loads(payload)
                except orjson.JSONDecodeError:
                    continue  # not ours to judge: a keep-alive or comment an upstream sent as data
                if not isinstance(body, dict):
                    continue
                if "error" in body and "choices" not in body:
                    message = f"{describe(call.target)} failed mid-stream: {body['error']}"
                    _failed(call, 502, message)
                    yield chunks.error(502, message)
                    return
                out = chunks.chunk(body)
                if call.first_token is None and (chunks.answer.text or chunks.answer.tool_calls):
                    call.first_token = time.perf_counter()
                if out:
                    yield out
            completed = True
            call.http_status = 200
            yield chunks.done()
        except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
            message = f"{describe(call.target)} broke off mid-stream: {type(exc).__name__}: {exc}"
            _failed(call, 502, message)
            yield chunks.error(502, message)
        finally:
            if not completed and call.status == "ok":
                _failed(call, 499, "the client went away before the stream ended")
            await stack.aclose()
            _fill(call, chunks.answer)
            await finish()

    return EventStream(relay(), headers={**SSE_HEADERS, **headers})


# --------------------------------------------------------------------------- Anthropic


async def anthropic_messages(gw: Gateway, request: Request) -> Response:
    """``POST /v1/messages``: translated to an OpenAI chat call upstream, and back."""
    api = "anthropic.messages"
    errors = _Errors(anthropic=True)
    try:
        caller, body, model, session = await _begin(gw, request, api)
        translated = anthropic_api.to_openai(body)
        target, variant = _route(gw, caller, model, session)
    except (BadRequest, Denied, UnknownModel, NoUpstream) as exc:
        return errors.refused(exc)
    metadata = body.get("metadata")
    user = metadata.get("user_id") if isinstance(metadata, dict) else None
    call = Call(api, target, session, caller.key, bool(body.get("stream")), prompt_of(translated["messages"]),
                _context(translated), user=user if isinstance(user, str) else None, prompt_variant=variant)
    call.about = _about(request)
    recorded = gw.recording.begin(call)
    system = gw.cfg.prompt_texts.get(variant) if variant else None
    upstream_body, _ = upstream_request(translated, target.upstream_model, system)
    finish = _finisher(gw, call, recorded)
    if not call.stream:
        return await _whole(gw, call, "/chat/completions", upstream_body, errors, finish, chat=True, anthropic=True)
    return await _streamed(gw, call, "/chat/completions", upstream_body, errors, finish, _AnthropicChunks(call))
