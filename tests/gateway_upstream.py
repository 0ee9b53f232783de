"""A minimal, deterministic OpenAI-compatible upstream for the gateway's tests and benchmark.

It answers at once (an asyncio protocol with a hand-written HTTP/1.1 reader, keep-alive, chunked streams), so
what a test or the benchmark measures is the gateway, not a model. The answer to a chat is ``answer: <the last
user message>`` split into words (one streamed chunk per word); a request that offers ``tools`` gets one call of
the first tool with ``{"path": "README.md"}``. ``/v1/completions`` answers ``completion: <prompt>``.

    python -m tests.gateway_upstream --port 0 --port-file F [--name NAME] [--chunk-delay S]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import orjson

__all__ = ["StubUpstream", "answer_words"]


def answer_words(prompt: str, prefix: str = "answer:") -> list[str]:
    words = [prefix, *prompt.split()]
    return [w if i == 0 else " " + w for i, w in enumerate(words)]


class _Protocol(asyncio.Protocol):
    def __init__(self, stub: StubUpstream) -> None:
        self.stub = stub
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio's classes
        self.stub.connections.add(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.stub.connections.discard(self.transport)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._next()

    def _next(self) -> None:
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buf[:end].decode("latin-1").split("\r\n")
        method, path, _ = head[0].split(" ", 2)
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:])}
        length = int(headers.get("content-length", "0"))
        if len(self.buf) < end + 4 + length:
            return
        body = self.buf[end + 4 : end + 4 + length]
        self.buf = self.buf[end + 4 + length :]
        self.busy = True
        asyncio.get_running_loop().create_task(self._handle(method, path, body))

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _reply(self, status: int, body: bytes) -> None:
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found"}.get(status, "Error")
        self._write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
                    f"\r\nConnection: keep-alive\r\n\r\n".encode() + body)

    async def _handle(self, method: str, path: str, raw: bytes) -> None:
        try:
            await self.stub.serve(self, method, path.rstrip("/"), raw)
        finally:
            self.busy = False
            self._next()


class StubUpstream:
    """The stub; ``start`` in a running loop, or ``start_in_thread`` for a synchronous caller."""

    def __init__(self, name: str = "stub", chunk_delay: float = 0.0) -> None:
        self.name = name
        self.chunk_delay = chunk_delay
        self.requests: list[dict[str, Any]] = []
        self.connections: set[asyncio.Transport] = set()
        self.server: asyncio.AbstractServer | None = None
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self, port: int = 0) -> StubUpstream:
        self._loop = asyncio.get_running_loop()
        self.server = await self._loop.create_server(lambda: _Protocol(self), "127.0.0.1", port, backlog=2048)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def start_in_thread(self, port: int = 0) -> StubUpstream:
        ready = threading.Event()
        loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(self.start(port))
            ready.set()
            loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True, name=f"stub-{self.name}")
        self._thread.start()
        ready.wait(10)
        return self

    async def stop(self) -> None:
        """Close the listener and every connection (what a killed server looks like to its clients)."""
        if self.server is not None:
            self.server.close()
            for transport in list(self.connections):
                transport.abort()
            self.server = None

    def stop_in_thread(self) -> None:
        if self._loop is not None and self._thread is not None:
            asyncio.run_coroutine_threadsafe(self.stop(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    async def serve(self, proto: _Protocol, method: str, path: str, raw: bytes) -> None:
        if method == "GET" and path == "/v1/models":
            proto._reply(200, orjson.dumps({"object": "list", "data": [{"id": self.name, "object": "model"}]}))
            return
        if method != "POST" or path not in ("/v1/chat/completions", "/v1/completions"):
            proto._reply(404, orjson.dumps({"error": {"message": f"no route {method} {path}"}}))
            return
        body = orjson.loads(raw)
        self.requests.append(body)
        chat = path.endswith("chat/completions")
        if chat:
            users = [m for m in body.get("messages", []) if m.get("role") == "user"]
            prompt = str(users[-1].get("content", "")) if users else ""
            words = answer_words(prompt)
        else:
            prompt = str(body.get("prompt", ""))
            words = answer_words(prompt, "completion:")
        tool = body["tools"][0]["function"]["name"] if chat and body.get("tools") else None
        usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": len(words),
                 "total_tokens": len(prompt.split()) + len(words)}
        ident = f"up-{time.time_ns():x}"
        model = body.get("model", self.name)
        kind = "chat.completion" if chat else "text_completion"
        if not body.get("stream"):
            if chat:
                message: dict[str, Any] = {"role": "assistant", "content": None if tool else "".join(words)}
                if tool:
                    message["tool_calls"] = [{"id": "call_1", "type": "function",
                                              "function": {"name": tool, "arguments": '{"path": "README.md"}'}}]
                choice: dict[str, Any] = {"index": 0, "message": message,
                                          "finish_reason": "tool_calls" if tool else "stop"}
            else:
                choice = {"index": 0, "text": "".join(words), "finish_reason": "stop"}
            proto._reply(200, orjson.dumps({"id": ident, "object": kind, "created": int(time.time()), "model": model,
                                            "choices": [choice], "usage": usage}))
            return
        proto._write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
                     b"Connection: keep-alive\r\n\r\n")

        def send(data: bytes) -> None:
            payload = b"data: " + data + b"\n\n"
            proto._write(f"{len(payload):x}\r\n".encode() + payload + b"\r\n")

        base = {"id": ident, "object": f"{kind}.chunk", "created": int(time.time()), "model": model}
        if tool:
            pieces = [{"index": 0, "id": "call_1", "type": "function", "function": {"name": tool, "arguments": ""}},
                      {"index": 0, "function": {"arguments": '{"path": '}},
                      {"index": 0, "function": {"arguments": '"README.md"}'}}]
            for piece in pieces:
                send(orjson.dumps({**base, "choices": [{"index": 0, "delta": {"tool_calls": [piece]},
                                                        "finish_reason": None}]}))
            finish = "tool_calls"
        else:
            for i, word in enumerate(words):
                if self.chunk_delay:
                    await asyncio.sleep(self.chunk_delay)
                delta = ({"role": "assistant", "content": word} if i == 0 else {"content": word}) if chat else None
                choice = {"index": 0, "delta": delta, "finish_reason": None} if chat else \
                    {"index": 0, "text": word, "finish_reason": None}
                send(orjson.dumps({**base, "choices": [choice]}))
            finish = "stop"
        last = {"index": 0, "delta": {}, "finish_reason": finish} if chat else \
            {"index": 0, "text": "", "finish_reason": finish}
        send(orjson.dumps({**base, "choices": [last]}))
        options = body.get("stream_options") or {}
        if options.get("include_usage"):
            send(orjson.dumps({**base, "choices": [], "usage": usage}))
        send(b"[DONE]")
        proto._write(b"0\r\n\r\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--port-file", type=Path)
    parser.add_argument("--name", default="stub")
    parser.add_argument("--chunk-delay", type=float, default=0.0)
    args = parser.parse_args()

    async def run() -> None:
        stub = await StubUpstream(args.name, args.chunk_delay).start(args.port)
        if args.port_file:
            tmp = args.port_file.with_name(f".{args.port_file.name}.{os.getpid()}")
            tmp.write_text(f"{stub.port}\n")
            os.replace(tmp, args.port_file)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await stub.stop()

    try:
        import uvloop

        uvloop.run(run())
    except ImportError:
        asyncio.run(run())


if __name__ == "__main__":
    main()
