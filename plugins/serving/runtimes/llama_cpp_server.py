"""A small OpenAI-compatible HTTP server around one llama.cpp model, optionally with a GGUF LoRA adapter.

Run as ``python -m plugins.runtimes.llama_cpp_server --model base.gguf --lora adapter.gguf --alias NAME
--port-file F`` from the project root (not as a script: its folder's ``llama_cpp.py`` would shadow the package)
by ``plugins/runtimes/llama_cpp.py``, one process per served version, so a crash in native code takes down one
version, not the engine. It imports only the standard library, ``llama_cpp`` and the HTTP handler shared
with the transformers server (``openai_api.py``, standard library only).

Why not ``python -m llama_cpp.server``: that needs four more packages (its ``server`` extra) and cannot turn the
extra buffer types off (``use_extra_bufts``, llama-server's ``--no-repack``), the workaround for builds whose
repacked matrix paths crash; everything else it would do here is what these ~150 lines do.

Endpoints: ``GET /v1/models``, ``GET /health``, ``POST /v1/chat/completions`` and ``POST /v1/completions``
(whole, or streamed as OpenAI chunks with ``stream: true``). Requests are served one at a time (llama.cpp contexts are
not thread-safe). The server binds ``--host`` on ``--port`` (0 = a free port; a taken one fails before the model
loads), loads the model, writes the port to ``--port-file`` and then answers; the llama.cpp system info line it
logs first shows which CPU paths were built. With ``--parent-pid`` it stops when that process is gone.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from flywheel_loop.plugins.serving.runtimes.openai_api import BadRequest, OpenAIHandler

SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "repeat_penalty")


def _sampling(body: dict[str, Any]) -> dict[str, Any]:
    out = {key: body[key] for key in SAMPLING_KEYS if body.get(key) is not None}
    for key in ("max_tokens", "top_k", "seed"):
        if key in out and (not isinstance(out[key], int) or isinstance(out[key], bool)):
            raise BadRequest(f"{key} must be an integer, got {out[key]!r}")
    for key in ("temperature", "top_p", "repeat_penalty"):
        if key in out and not isinstance(out[key], (int, float)):
            raise BadRequest(f"{key} must be a number, got {out[key]!r}")
    out.setdefault("max_tokens", 256)
    return out


def build_handler(llm: Any, alias: str) -> type[BaseHTTPRequestHandler]:
    lock = threading.Lock()
    started = int(time.time())

    class Handler(OpenAIHandler):
        model_name = alias
        created = started

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            sys.stderr.write(f"{self.address_string()} {format % args}\n")

        def do_POST(self) -> None:  # noqa: N802
            route = self.path.rstrip("/")
            if route not in ("/v1/chat/completions", "/v1/completions"):
                self._error(404, f"no route POST {self.path}; try /v1/chat/completions")
                return
            try:
                body = self._read_request()
                if body is None:
                    return
                params = _sampling(body)
                if route == "/v1/chat/completions":
                    messages = body.get("messages")
                    if not isinstance(messages, list) or not messages:
                        raise BadRequest("messages must be a non-empty list of {role, content} objects")
                    if body.get("stream"):
                        self._stream(lambda: llm.create_chat_completion(messages=messages, stream=True, **params))
                        return
                    with lock:
                        result = llm.create_chat_completion(messages=messages, **params)
                else:
                    prompt = body.get("prompt")
                    if not isinstance(prompt, str):
                        raise BadRequest("prompt must be a string")
                    if body.get("stream"):
                        self._stream(lambda: llm.create_completion(prompt=prompt, stream=True, **params))
                        return
                    with lock:
                        result = llm.create_completion(prompt=prompt, **params)
            except (BadRequest, json.JSONDecodeError, ValueError) as exc:
                self._error(400, str(exc))
                return
            except Exception as exc:  # a generation error must answer, not hang the client
                self._error(500, f"generation failed: {exc}", "server_error")
                return
            result["model"] = alias
            self._send(200, result)

        def _stream(self, start: Any) -> None:
            """llama-cpp-python's own OpenAI chunks, relayed as server-sent events (one generation at a time)."""
            with lock:
                chunks = start()
                self._start_stream()
                try:
                    for chunk in chunks:
                        chunk["model"] = alias
                        self._send_event(chunk)
                except Exception as exc:  # headers are gone: the error travels as an event
                    self._send_event({"error": {"message": f"generation failed: {exc}", "type": "server_error"}})
                self._end_stream()

    return Handler


def load_model(args: argparse.Namespace) -> Any:
    import llama_cpp

    if args.no_repack:
        # Llama() takes its model parameters from llama_model_default_params(); wrapping it is the one way to
        # turn the extra buffer types (weight repacking) off through the Python API.
        defaults = llama_cpp.llama_model_default_params

        def no_repack_params() -> Any:
            params = defaults()
            params.use_extra_bufts = False
            return params

        llama_cpp.llama_model_default_params = no_repack_params
    print(f"llama.cpp system info: {llama_cpp.llama_print_system_info().decode()}", flush=True)
    return llama_cpp.Llama(
        model_path=str(args.model),
        lora_path=str(args.lora) if args.lora else None,
        n_ctx=args.n_ctx,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        seed=0,
        verbose=args.verbose,
    )


def _exit_with_parent(parent_pid: int, server: ThreadingHTTPServer) -> None:
    """Stop serving when the process that started this server is gone (killed without stopping it)."""
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    print(f"parent process {parent_pid} is gone: stopping", flush=True)
    server.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="the base model, a GGUF file")
    parser.add_argument("--lora", type=Path, help="a GGUF LoRA adapter applied to it")
    parser.add_argument("--alias", required=True, help="the model name /v1/models lists and requests use")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 = a free port")
    parser.add_argument("--port-file", type=Path, help="written with the port once the server answers")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--no-repack", action="store_true", help="turn ggml's extra buffer types off")
    parser.add_argument("--parent-pid", type=int, help="stop when this process (the engine) is gone")
    parser.add_argument("--verbose", action="store_true", help="llama.cpp's own load and timing logs")
    args = parser.parse_args(argv)
    for path in (args.model, args.lora):
        if path is not None and not path.is_file():
            print(f"error: {path} does not exist", file=sys.stderr)
            return 2

    # Bind first: a taken --port fails at once, before the model loads. Requests wait in the backlog until
    # serve_forever; the port file (what the runtime waits for) is written only once the model is loaded.
    server = ThreadingHTTPServer((args.host, args.port), BaseHTTPRequestHandler, bind_and_activate=True)
    port = server.server_address[1]
    server.RequestHandlerClass = build_handler(load_model(args), args.alias)

    def stop(signum: int, frame: Any) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if args.parent_pid:
        threading.Thread(target=_exit_with_parent, args=(args.parent_pid, server), daemon=True).start()
    if args.port_file is not None:
        tmp = args.port_file.with_name(f".{args.port_file.name}.{os.getpid()}")
        tmp.write_text(f"{port}\n")
        os.replace(tmp, args.port_file)
    print(f"serving {args.alias} on http://{args.host}:{port}/v1", flush=True)
    server.serve_forever()
    server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
