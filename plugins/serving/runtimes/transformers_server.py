"""The transformers + PEFT runtime: the fallback that always works (``deployer.runtime = "transformers"``).

It needs nothing beyond the engine's own dependencies: the base model is the Hugging Face folder the trainer
started from, the adapter is the trainer's PEFT folder, and each served version answers on its own localhost
port with an OpenAI-compatible API (``GET /v1/models``, ``POST /v1/chat/completions``) rendered through the
base model's chat template. Generation is greedy at temperature 0 (the default), so the same prompt gives the
same answer, which is what a smoke test and a before/after comparison need.

Where it runs: inside the engine's process, one ``ThreadingHTTPServer`` thread per served version (the model
is loaded once in ``prepare``, the adapter merged into the base weights in float32: the same function, a
quarter less time per token; an adapter with a router, ``plugins/shared/routing.py``, stays unmerged, and the
requests its router sends away are answered with the adapter off, by the base model). Greedy requests to
one version that arrive together are generated as one batch
(``batching.py``; ``deployer.max_batch``); streaming and sampled ones one at a time. ``stream: true`` answers with
OpenAI's chat completion chunks (server-sent events) as tokens are generated, the usage last when the request asks
for it (``stream_options.include_usage``). The servers end when the
engine's process ends (daemon threads; ``close`` stops them earlier), and the deployer serves again, when the
engine starts, whatever its book says is in service.
``python -m flywheel_loop.plugins.serving.runtimes.transformers_server --base DIR [--adapter DIR] --name NAME
--port N [--max-batch N]`` serves one version from a shell, outside the engine.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from flywheel_loop.engine.extensions import RuntimeUnavailable, ServedModel
from flywheel_loop.plugins.serving.runtimes.batching import GreedyBatcher
from flywheel_loop.plugins.serving.runtimes.openai_api import BadRequest, OpenAIHandler
from flywheel_loop.plugins.serving.settings import DeployerConfig
from flywheel_loop.plugins.shared.models import use_bf16
from flywheel_loop.plugins.shared.openai_client import post_chat
from flywheel_loop.plugins.shared.routing import Router, RouterUnusable, router_embedder, user_text

__all__ = ["ChatModel", "TransformersRuntime", "load_chat_model", "serve_chat_model"]

log = logging.getLogger(__name__)


@dataclass
class ChatModel:
    """A base model with an optional PEFT adapter applied, and its tokenizer; one generation at a time, which
    answers the greedy requests queued together (``batching.py``)."""

    model: Any
    tokenizer: Any
    name: str
    #: torch threads while generating (None: leave torch's setting); more threads than free cores busy-wait
    threads: int | None = 1
    #: generate under bf16 autocast (models.precision, resolved by plugins/shared/precision.py)
    bf16: bool = False
    #: greedy requests answered in one batch at most (1: each alone)
    max_batch: int = 16
    #: the adapter's router (``plugins/shared/routing.py``) and the embedding it reads prompts with: a request
    #: it sends away is answered by the base model (the adapter off); None: the adapter answers everything
    router: Router | None = None
    embed: Callable[[Sequence[str]], Any] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    batcher: GreedyBatcher = field(init=False)
    #: the base model's requests, batched apart (the same lock: one generation at a time)
    base_batcher: GreedyBatcher = field(init=False)

    def __post_init__(self) -> None:
        self.batcher = GreedyBatcher(self._generate_rows, self.lock, self.max_batch)
        self.base_batcher = GreedyBatcher(self._generate_base_rows, self.lock, self.max_batch)

    def to_adapter(self, messages: list[dict[str, str]]) -> bool:
        """Whether the adapter answers this chat: its last user message routed (always, without a router)."""
        if self.router is None or self.embed is None:
            return True
        return self.router.routes([user_text({"messages": messages})], self.embed)[0]

    def _encode(self, messages: list[dict[str, str]]) -> Any:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:  # a base model without a template: a plain transcript it can continue
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
        return tok(str(text), return_tensors="pt", add_special_tokens=False)

    @contextmanager
    def _generating(self, base: bool = False) -> Iterator[None]:
        """No gradients, this model's torch threads and precision, the adapter off for ``base``: how every
        generation here runs."""
        import torch

        from flywheel_loop.plugins.shared.models import torch_threads

        with torch.no_grad(), torch_threads(self.threads), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16), \
                (self.model.disable_adapter() if base else nullcontext()):
            yield

    def _cut(self, ids: list[int]) -> list[int]:
        """``ids`` up to the first end-of-sequence token (the tokenizer's or one of the generation config's)."""
        config = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ends = {self.tokenizer.eos_token_id} | set(config if isinstance(config, list) else [config])
        return next((ids[:i] for i, t in enumerate(ids) if t in ends), ids)

    def _generate(self, enc: Any, max_tokens: int, temperature: float, base: bool = False, **extra: Any) -> list[int]:
        """The generated token ids up to (not including) the end-of-sequence token; ``base``: the adapter off."""
        from flywheel_loop.plugins.shared.inference import GrowingCache

        tok = self.tokenizer
        sampling: dict[str, Any] = {"do_sample": False}
        if temperature > 0:
            sampling = {"do_sample": True, "temperature": temperature}

        with self.lock, self._generating(base):
            out = self.model.generate(**enc, max_new_tokens=max_tokens, pad_token_id=tok.pad_token_id, **sampling,
                                      cache=GrowingCache(), **extra)
        return self._cut(out[0, enc["input_ids"].shape[1]:].tolist())

    def _generate_base_rows(self, prompts: Sequence[list[int]], limits: Sequence[int]) -> list[list[int]]:
        return self._generate_rows(prompts, limits, base=True)

    def _generate_rows(self, prompts: Sequence[list[int]], limits: Sequence[int], base: bool = False
                       ) -> list[list[int]]:
        """Greedy answers (token ids up to the end-of-sequence token) to ``prompts`` as one left-padded batch,
        each at most its limit (``base``: the adapter off); the caller holds the lock."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        from flywheel_loop.plugins.shared.inference import GrowingCache

        tok = self.tokenizer
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        limit = torch.tensor(list(limits))

        class RowLimit(StoppingCriteria):  # each row ends at its own max_tokens
            def __call__(self, ids: Any, scores: Any, **kwargs: Any) -> Any:
                return torch.full((ids.shape[0],), ids.shape[1] - width) >= limit

        with self._generating(base):
            out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                                      max_new_tokens=max(limits), pad_token_id=tok.pad_token_id,
                                      stopping_criteria=StoppingCriteriaList([RowLimit()]), cache=GrowingCache())
        return [self._cut(row[:n]) for row, n in zip(out[:, width:].tolist(), limits, strict=True)]

    def complete(self, messages: list[dict[str, str]], max_tokens: int, temperature: float) -> tuple[str, int, int]:
        """(answer, prompt tokens, completion tokens) for a chat, through the base model's chat template; a
        greedy one is generated in a batch with the greedy requests that arrive with it."""
        enc = self._encode(messages)
        adapter = self.to_adapter(messages)
        if temperature > 0:
            ids = self._generate(enc, max_tokens, temperature, base=not adapter)
        else:
            batcher = self.batcher if adapter else self.base_batcher
            ids = batcher.complete(enc["input_ids"][0].tolist(), max_tokens)
        answer = self.tokenizer.decode(ids, skip_special_tokens=True)
        return answer, int(enc["input_ids"].shape[1]), len(ids)

    def stream(self, messages: list[dict[str, str]], max_tokens: int, temperature: float,
               usage: dict[str, int]) -> Iterator[str]:
        """The answer in pieces as they are generated (the same text ``complete`` gives); ``usage`` is filled with
        the prompt and completion tokens once the last piece is out. Generation runs on a thread of its own."""
        from transformers import TextIteratorStreamer

        enc = self._encode(messages)
        adapter = self.to_adapter(messages)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        failure: list[BaseException] = []

        def run() -> None:
            try:
                ids = self._generate(enc, max_tokens, temperature, base=not adapter, streamer=streamer)
                usage.update(prompt_tokens=int(enc["input_ids"].shape[1]), completion_tokens=len(ids))
            except BaseException as exc:  # handed to the reader below, which answers with it
                failure.append(exc)
                streamer.end()  # type: ignore[no-untyped-call]

        thread = threading.Thread(target=run, name=f"stream-{self.name}", daemon=True)
        thread.start()
        for piece in streamer:
            if piece:
                yield piece
        thread.join()
        if failure:
            raise failure[0]


def load_chat_model(base_dir: Path, adapter_dir: Path | None, name: str, threads: int | None = 1,
                    bf16: bool = False, max_batch: int = 16, state_dir: Path | None = None) -> ChatModel:
    """Load ``base_dir`` (fp32, eval mode) with the PEFT adapter in ``adapter_dir`` applied, if any (merged into
    its weights unless ``bf16`` or the adapter has a router); ``bf16``: generate under bf16 autocast;
    ``max_batch``: greedy requests generated together at most; ``state_dir``: where the embedding's precision
    probe is cached (an adapter with a router)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (base_dir / "config.json").is_file():
        raise RuntimeUnavailable(
            f"base model {base_dir} is not a Hugging Face model folder (no config.json): set models.base"
            " to the folder the adapters were trained on"
        )
    if adapter_dir is not None and not (adapter_dir / "adapter_config.json").is_file():
        raise RuntimeUnavailable(
            f"adapter {adapter_dir} is not a PEFT adapter folder (no adapter_config.json): was it deleted from"
            " <state_dir>/adapters?"
        )
    router = embed = None
    try:
        router = Router.load(adapter_dir) if adapter_dir is not None else None
        if router is not None:
            # the version's torch threads (set process-wide while it embeds); loaded now, not on a first request
            embed = router_embedder(state_dir, threads).embed
    except RouterUnusable as exc:
        raise RuntimeUnavailable(f"could not load {name}'s router: {exc}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(base_dir), local_files_only=True)
        model: Any = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32, local_files_only=True)
        if adapter_dir is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
            if not bf16 and router is None:
                # merged: the low-rank products folded into the weights they adapt, so a token costs what the
                # base model's does (the unmerged adapter took a token from 139 to 187 ms at 1 thread). Not under
                # bf16: the merged weight would be rounded to bf16 whole, and a small change lost in its last bits;
                # not with a router: the requests it sends away need the weights without the adapter
                model = model.merge_and_unload()
    except RuntimeUnavailable:
        raise
    except Exception as exc:  # transformers/peft raise OSError, ValueError, KeyError, RuntimeError...
        raise RuntimeUnavailable(f"could not load {name} ({base_dir} + {adapter_dir or 'no adapter'}): {exc}") from exc
    from flywheel_loop.plugins.shared.inference import for_answering

    for_answering(model, bf16)  # the same products, without autocast casting every weight at every token
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return ChatModel(model=model, tokenizer=tokenizer, name=name, threads=threads, bf16=bf16, max_batch=max_batch,
                     router=router, embed=embed)


def _sampling(body: dict[str, Any]) -> tuple[int, float]:
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens", 256))
    temperature = body.get("temperature", 0.0)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= 4096:
        raise BadRequest("max_tokens must be an integer from 1 to 4096")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not 0 <= temperature <= 2:
        raise BadRequest("temperature must be a number from 0 to 2")
    return max_tokens, float(temperature)


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list of {role, content} objects")
    for m in messages:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise BadRequest("each message must be an object with a string role and a string content")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def build_handler(chat: ChatModel) -> type[BaseHTTPRequestHandler]:
    """The OpenAI-compatible request handler for one served version."""
    started = int(time.time())

    class Handler(OpenAIHandler):
        model_name = chat.name
        created = started

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            log.debug("%s %s", self.address_string(), format % args)

        def do_POST(self) -> None:  # noqa: N802
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._error(404, f"no route POST {self.path}; try /v1/chat/completions")
                return
            try:
                body = self._read_request()
                if body is None:
                    return
                max_tokens, temperature = _sampling(body)
                messages = _messages(body)
                if body.get("stream"):
                    self._stream(messages, max_tokens, temperature, body.get("stream_options"))
                    return
                answer, prompt_tokens, completion_tokens = chat.complete(messages, max_tokens, temperature)
            except (BadRequest, json.JSONDecodeError) as exc:
                self._error(400, str(exc))
                return
            except Exception as exc:  # a generation error must answer, not hang the client
                self._error(500, f"generation failed: {exc}", "server_error")
                return
            finish = "length" if completion_tokens >= max_tokens else "stop"
            self._send(200, {
                "id": f"chatcmpl-{time.time_ns():x}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": chat.name,
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": finish}
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            })

        def _stream(self, messages: list[dict[str, str]], max_tokens: int, temperature: float,
                    options: Any) -> None:
            """The answer as OpenAI chat completion chunks (server-sent events), the usage last when asked for."""
            base = {"id": f"chatcmpl-{time.time_ns():x}", "object": "chat.completion.chunk",
                    "created": int(time.time()), "model": chat.name}
            usage: dict[str, int] = {}
            self._start_stream()
            self._send_event({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                   "finish_reason": None}]})
            try:
                for piece in chat.stream(messages, max_tokens, temperature, usage):
                    self._send_event({**base, "choices": [{"index": 0, "delta": {"content": piece},
                                                           "finish_reason": None}]})
            except Exception as exc:  # headers are gone: the error travels as an event, as OpenAI's does
                self._send_event({"error": {"message": f"generation failed: {exc}", "type": "server_error"}})
                self._end_stream()
                return
            completion = usage.get("completion_tokens", 0)
            finish = "length" if completion >= max_tokens else "stop"
            self._send_event({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
            if isinstance(options, dict) and options.get("include_usage"):
                prompt = usage.get("prompt_tokens", 0)
                self._send_event({**base, "choices": [], "usage": {
                    "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}})
            self._end_stream()

    return Handler


def serve_chat_model(chat: ChatModel, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """Start answering for ``chat`` on ``host:port`` (0 = a free port) in a daemon thread."""
    server = ThreadingHTTPServer((host, port), build_handler(chat))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name=f"serve-{chat.name}", daemon=True)
    thread.start()
    return server


@dataclass
class _Served:
    chat: ChatModel
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str | None:
        if self.server is None:
            return None
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}/v1"


class TransformersRuntime:
    """Serves versions with transformers + PEFT inside the engine's process; see the module docstring."""

    name = "transformers"

    def __init__(self, settings: Any) -> None:
        cfg = DeployerConfig.of(settings)
        self.host: str = str(cfg.host)
        self.threads: int | None = cfg.threads
        self.max_batch: int = cfg.max_batch
        models = getattr(settings, "models", None)
        self._precision: str = str(getattr(models, "precision", "fp32"))
        self._state_dir: Path | None = getattr(settings, "state_dir", None)
        self._bf16: bool | None = None
        self._served: dict[str, _Served] = {}
        self._lock = threading.RLock()

    def prepare(self, model: ServedModel) -> None:
        """Load the base model with the adapter applied (the slow part); nothing answers yet."""
        with self._lock:
            if model.model_name in self._served:
                return
        if self._bf16 is None:  # models.precision; auto: the cached probe, measured once per machine
            self._bf16 = use_bf16(self._precision, "cpu", self._state_dir)
        chat = load_chat_model(model.base_model_dir, model.adapter_dir, model.model_name, self.threads, self._bf16,
                               self.max_batch, self._state_dir)
        with self._lock:
            self._served.setdefault(model.model_name, _Served(chat))

    def serve(self, model: ServedModel, port: int = 0) -> str:
        """Start the version's server (on ``port``, or a free one: 0), loading it first if needed; return
        ``http://host:port/v1``. A version already served keeps its server."""
        self.prepare(model)
        with self._lock:
            served = self._served[model.model_name]
            if served.server is None:
                try:
                    served.server = serve_chat_model(served.chat, self.host, port)
                except OSError as exc:
                    raise RuntimeUnavailable(
                        f"could not listen on {self.host} for {model.model_name}: {exc} (deployer.host)"
                    ) from exc
            url = served.url
        assert url is not None
        return url

    def url(self, model: ServedModel) -> str | None:
        """The base URL ``model`` is served at, or None when it is not being served."""
        with self._lock:
            served = self._served.get(model.model_name)
            return served.url if served is not None else None

    def generate(self, model: ServedModel, prompt: str, max_tokens: int = 64, temperature: float = 0.0) -> str:
        """One chat completion through the version's HTTP endpoint (what an agent would get)."""
        url = self.url(model)
        if url is None:
            raise RuntimeUnavailable(f"{model.model_name} is not being served by transformers: call serve() first")
        try:
            answer = post_chat(url, model.model_name, prompt, max_tokens, temperature, timeout_s=300)
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            raise RuntimeUnavailable(f"{model.model_name} at {url} answered {exc.code}: {detail}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise RuntimeUnavailable(f"{model.model_name} at {url} did not answer: {exc}") from exc
        return str(answer["choices"][0]["message"]["content"])

    def stop(self, model: ServedModel) -> None:
        """Stop answering for ``model`` and free its weights (nothing happens when it is not served)."""
        with self._lock:
            served = self._served.pop(model.model_name, None)
        if served is not None and served.server is not None:
            served.server.shutdown()
            served.server.server_close()

    def serving(self) -> list[str]:
        """The model names this runtime is serving now."""
        with self._lock:
            return sorted(name for name, s in self._served.items() if s.server is not None)

    def close(self) -> None:
        """Stop every version this runtime serves."""
        with self._lock:
            names = list(self._served)
        for name in names:
            self.stop(ServedModel(role="", model_name=name, base_model_dir=Path()))


def main(argv: list[str] | None = None) -> int:
    """Serve one version from a shell until interrupted."""
    parser = argparse.ArgumentParser(description="Serve a base model + PEFT adapter with an OpenAI-compatible API")
    parser.add_argument("--base", type=Path, required=True, help="the Hugging Face base model folder")
    parser.add_argument("--adapter", type=Path, default=None, help="a PEFT adapter folder")
    parser.add_argument("--name", required=True, help="the model name clients ask for")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--threads", type=int, default=None, help="torch threads while generating")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="bf16 autocast or fp32; auto: bf16 only where native and measured faster")
    parser.add_argument("--max-batch", type=int, default=16,
                        help="greedy requests arriving together generated as one batch at most (1: each alone)")
    args = parser.parse_args(argv)
    if args.max_batch < 1:
        parser.error("--max-batch must be at least 1")
    try:
        chat = load_chat_model(args.base, args.adapter, args.name, args.threads,
                               use_bf16(args.precision, "cpu"), args.max_batch)
    except RuntimeUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    server = serve_chat_model(chat, args.host, args.port)
    print(f"serving {args.name} at http://{args.host}:{server.server_address[1]}/v1", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
