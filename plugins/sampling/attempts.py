"""The pure part of a sampling round: which recorded tasks are sampled, the k answers to one task
(seeded, batched in one forward pass), their verdicts in the sandbox, and pass@k.

A **task** is an anonymized interaction of the role whose context carries tests
(``context.tests``), that was not forgotten and is not held out for evaluation (the dataset
builder's hold-out rule, ``plugins/shared/holdout.py``). Its answers depend on the sampler's
seed, the task's interaction id and the model only, never on which other tasks share the round.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable
from dataclasses import dataclass
from math import comb
from typing import Any

from flywheel_loop.plugins.shared.code import extract_code
from flywheel_loop.plugins.shared.holdout import held_out
from flywheel_loop.plugins.shared.sandbox import run_tests
from flywheel_loop.schemas import DataForgotten, Event, InteractionAnonymized

__all__ = ["Attempt", "Task", "answer_hash", "pass_at_k", "sample_task", "select_tasks", "task_seed", "verify"]


@dataclass(frozen=True)
class Task:
    """A recorded task with tests."""

    interaction_id: str
    event_id: str  # its interaction.anonymized
    seq: int
    prompt: str
    tests: str


@dataclass(frozen=True)
class Attempt:
    """One sampled answer and what the sandbox said of it."""

    answer: str
    passed: bool
    timed_out: bool


def select_tasks(
    events: Iterable[tuple[int, Event[Any]]],
    role: str,
    position: int,
    max_tasks: int,
    holdout_seed: int,
    holdout_share: float,
) -> list[Task]:
    """The role's tasks with tests on the log up to ``position``: forgotten and held-out ones left
    out, at most ``max_tasks`` (the newest), in log order."""
    forgotten: set[str] = set()
    tasks: dict[str, Task] = {}
    for seq, event in events:
        data = event.data
        if isinstance(data, DataForgotten):
            forgotten.update(data.interaction_ids)
            forgotten.update(data.event_ids)
            continue
        if seq > position or event.forgotten or not isinstance(data, InteractionAnonymized):
            continue
        rec = data.interaction
        tests = rec.context.tests
        if rec.role != role or not tests or not tests.strip() or not rec.input.strip():
            continue
        if held_out(holdout_seed, holdout_share, data.interaction_id):
            continue
        tasks[data.interaction_id] = Task(data.interaction_id, event.id, seq, rec.input, tests)
    kept = [t for t in tasks.values() if t.interaction_id not in forgotten and t.event_id not in forgotten]
    kept.sort(key=lambda t: t.seq)
    return kept[-max_tasks:] if max_tasks else kept


def task_seed(seed: int, interaction_id: str) -> int:
    """The RNG seed of one task's answers."""
    return int.from_bytes(hashlib.sha256(f"{seed}\x1f{interaction_id}".encode()).digest()[:4], "big")


def answer_hash(answer: str) -> str:
    return hashlib.sha256(answer.encode()).hexdigest()


def chat_prompt(tokenizer: Any, text: str) -> str:
    """``text`` as a user turn in the model's chat template, ready for the answer."""
    if getattr(tokenizer, "chat_template", None):
        return str(tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True))
    return f"<|user|>\n{text}\n<|assistant|>\n"


def sample_task(
    model: Any, tokenizer: Any, task: Task, k: int, temperature: float, top_p: float, max_new_tokens: int, seed: int,
    bf16: bool = False, stop_after_code: bool = False,
) -> tuple[list[str], int]:
    """``k`` sampled answers to ``task`` in one batched forward pass (seeded by ``seed`` and the task);
    returns (answers, tokens generated). ``bf16``: under bf16 autocast. ``stop_after_code``: an answer
    ends once it has closed a fenced code block, and is cut there (``plugins/shared/stopping.py``): the
    tests read only the code, and the prose after it costs most of a small model's tokens."""
    import torch

    from flywheel_loop.plugins.shared.inference import GrowingCache
    from flywheel_loop.plugins.shared.stopping import closed_fence, through_code

    prompt = chat_prompt(tokenizer, task.prompt)
    device = next(model.parameters()).device
    enc = tokenizer([prompt], return_tensors="pt", add_special_tokens=False).to(device)
    torch.manual_seed(task_seed(seed, task.interaction_id))
    was_training = model.training
    model.eval()
    stop = closed_fence(tokenizer, enc["input_ids"].shape[1]) if stop_after_code else None
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, top_p=top_p,
                top_k=0, num_return_sequences=k, pad_token_id=tokenizer.pad_token_id, stopping_criteria=stop,
                cache=GrowingCache(),
            )
    finally:
        model.train(was_training)
    answers: list[str] = []
    produced = 0
    for row in out[:, enc["input_ids"].shape[1]:]:
        ids = row.tolist()
        if tokenizer.eos_token_id in ids:
            ids = ids[: ids.index(tokenizer.eos_token_id)]
        ids = [t for t in ids if t != tokenizer.pad_token_id]
        produced += len(ids)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        answers.append((through_code(text) or text) if stop_after_code else text)
    return answers, produced




def verify(answers: list[str], tests: str, timeout_s: float, memory_mb: int) -> list[Attempt]:
    """Run each answer's code against ``tests`` in the sandbox; an answer that misbehaves (an endless
    loop, a fork, a write outside its folder, the network, a memory bomb) is killed or refused and
    counts as failed."""
    out: list[Attempt] = []
    for answer in answers:
        started = time.monotonic()
        run = run_tests(extract_code(answer), tests, timeout_s=timeout_s, memory_mb=memory_mb)
        killed = run.timed_out or (not run.all_passed and time.monotonic() - started >= timeout_s)
        out.append(Attempt(answer, run.all_passed, killed))
    return out


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of a task with ``c`` passing answers out of ``n`` (Chen et al., 2021)."""
    if n <= 0 or k <= 0 or k > n:
        raise ValueError(f"pass@k needs 0 < k <= n, got n={n}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)
