"""An adapter's router (``plugins/shared/routing.py``): fitted on its dataset, stored beside its weights, and
followed alike by the gate (``plugins/evaluation/routed.py``) and the transformers runtime: a request nearer
the role's training prompts goes to the adapter, anything else to the base model."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import torch

from flywheel_loop.engine.extensions import RuntimeUnavailable
from flywheel_loop.plugins.evaluation import evaluator
from flywheel_loop.plugins.evaluation.evaluator import evaluate_run
from flywheel_loop.plugins.evaluation.generation import Generations
from flywheel_loop.plugins.evaluation.metrics import TaskResult
from flywheel_loop.plugins.evaluation.routed import Split, join_tasks, pick_generations, pick_tasks, routed
from flywheel_loop.plugins.serving.runtimes.gguf import refuse_router
from flywheel_loop.plugins.serving.runtimes.transformers_server import load_chat_model
from flywheel_loop.plugins.shared.embedding import DIM, EmbeddingConfig
from flywheel_loop.plugins.shared.models import store_adapter, verify_adapter
from flywheel_loop.plugins.shared.routing import ROUTER_FILE, Router, RouterUnusable, router_embedder, user_text
from flywheel_loop.plugins.training.trainer import train_dataset
from flywheel_loop.schemas import TrainingCompleted
from tests.serving import make_tiny_model
from tests.test_batching import context_heavy, needs_tokenizer, random_adapter
from tests.test_evaluator import GENERAL, WRONG, eval_settings, knowing_base, write_eval_dataset  # noqa: F401
from tests.test_trainer import formatter, tiny_model_dir  # noqa: F401  (fixtures)

SHOP = ["Write a Python function `price_label(cents)` that returns the price `cents` in the shop price format.",
        "Write a Python function `stock_line(category, number, count)` that returns the shop SKU and the count.",
        "Write a Python function `vat_label(cents)` that returns the shop VAT of a price in the shop price format."]
GENERAL_PROMPTS = ["Explain what a Python dictionary is in two sentences.",
                   "Write a Python function `reverse_words(s)` that reverses the order of the words in `s`.",
                   "What does the word idempotent mean?"]


def row(prompt: str, source: str = "correction") -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": "x"}],
            "source": source, "prompt": f"<user>{prompt}<assistant>"}


def axis_embed(texts: Any) -> np.ndarray:
    """Unit vectors by a word in the text: 'shop' on one axis, anything else on another, 'both' between."""
    out = np.zeros((len(texts), DIM), dtype=np.float32)
    for i, t in enumerate(texts):
        out[i, :2] = [1, 1] if "both" in t else [1, 0] if "shop" in t else [0, 1]
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def same(a: Router | None, b: Router | None) -> bool:
    return a is not None and b is not None and np.array_equal(a.role, b.role) and np.array_equal(a.general, b.general)


# --------------------------------------------------------------------------- the router alone


def test_a_router_is_fitted_on_the_role_rows_against_the_self_synthesized_ones() -> None:
    rows = [row(p) for p in SHOP] + [row(p, "synthetic") for p in GENERAL_PROMPTS] + [row(SHOP[0])]
    embedded: list[list[str]] = []

    def embed(texts: Any) -> np.ndarray:
        embedded.append(list(texts))
        return axis_embed(texts)

    router = Router.fit(rows, embed)
    assert router is not None
    assert embedded == [sorted(SHOP), sorted(GENERAL_PROMPTS)]  # unique, sorted: vectors, never the prompts, kept
    assert router.role.shape == (3, DIM) and router.general.shape == (3, DIM)
    assert same(Router.fit(list(reversed(rows)), axis_embed), router)  # the order of the rows changes nothing
    assert Router.fit([row(p) for p in SHOP], axis_embed) is None  # nothing general to tell the role's requests from
    assert Router.fit([row(p, "synthetic") for p in GENERAL_PROMPTS], axis_embed) is None
    assert user_text({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                   {"role": "user", "content": "c"}]}) == "c"
    assert user_text({"text": "t"}) == "t" and user_text({"prompt": "templated only"}) is None


def test_requests_go_to_the_nearer_side_and_a_tie_to_the_base_model() -> None:
    router = Router(axis_embed(["shop a", "shop b"]), axis_embed(["other a"]))
    assert router.routes(["the shop price", "a general question", "both"], axis_embed) == [True, False, False]
    assert router.routes([], axis_embed) == []
    assert router.routes([None, "", "other words"], axis_embed) == [True, True, False]  # no text: the adapter


def test_a_router_survives_its_folder_and_a_damaged_one_is_refused(tmp_path: Path) -> None:
    from safetensors.numpy import save

    router = Router(axis_embed(SHOP), axis_embed(GENERAL_PROMPTS))
    (tmp_path / ROUTER_FILE).write_bytes(router.to_bytes())
    assert same(Router.load(tmp_path), router)
    assert router.to_bytes() == Router(axis_embed(SHOP), axis_embed(GENERAL_PROMPTS)).to_bytes()  # its identity
    assert Router.load(tmp_path / "elsewhere") is None  # no router: the adapter answers everything
    vectors = axis_embed(["x"])
    for damaged in (b"not safetensors",
                    save({"role": vectors, "general": vectors}, metadata={"rule": "classifier"}),
                    save({"role": vectors[:, :7], "general": vectors}, metadata={"rule": "nearest"}),
                    save({"role": vectors}, metadata={"rule": "nearest"})):
        (tmp_path / ROUTER_FILE).write_bytes(damaged)
        with pytest.raises(RouterUnusable):
            Router.load(tmp_path)


def test_the_real_embedding_sends_the_shop_to_the_adapter_and_general_work_elsewhere(tmp_path: Path) -> None:
    embed = router_embedder(tmp_path).embed
    router = Router.fit([row(p) for p in SHOP[:2]] + [row(p, "synthetic") for p in GENERAL_PROMPTS], embed)
    assert router is not None
    held_out = ["Write a Python function `discount_label(cents, percent)` that returns the discounted price in the"
                " shop price format.", SHOP[2]]
    general = ["Write a Python function `count_vowels(s)` that returns how many vowels `s` holds.",
               "What is the difference between a list and a tuple in Python?"]
    assert router.routes(held_out + general, embed) == [True, True, False, False]


# --------------------------------------------------------------------------- measuring in two parts


def test_a_split_measures_each_part_on_its_side_and_joins_them_in_order() -> None:
    split = Split((True, False, True, False))
    rows = ["a", "b", "c", "d"]
    assert split.part(rows) == ["a", "c"] and split.part(rows, adapter=False) == ["b", "d"]
    joined = routed(split, rows, lambda part: [f"adapter:{x}" for x in part],
                    lambda part: [f"base:{x}" for x in part], split.join)
    assert joined == ["adapter:a", "base:b", "adapter:c", "base:d"]
    assert routed(Split.everything(2), ["a", "b"], lambda p: p, lambda p: pytest.fail("nothing is routed"),
                  split.join) == ["a", "b"]
    with pytest.raises(ValueError):
        split.join(["1", "2", "3"], ["4", "5"])


def test_task_results_are_picked_and_joined_by_row() -> None:
    rows = [{"id": "t0", "tests": "x"}, {"id": "t1"}, {"id": "t2", "tests": "x"}, {"id": "t3", "tests": "x"}]
    service = TaskResult(3, 2, Generations(["s0", "s2", "s3"], 30, 3.0), ("t2: wrong",), (True, False, True))
    split = Split((True, True, False, False))  # t0 (and t1, no tests) to the adapter; t2, t3 to the base model
    rest = pick_tasks(service, rows, [not a for a in split.to_adapter])
    assert (rest.examples, rest.passed, rest.outcomes, rest.failures) == (2, 1, (False, True), ("t2: wrong",))
    assert rest.generations.texts == ["s2", "s3"] and rest.generations.tokens == 20
    assert rest.generations.seconds == pytest.approx(2.0)
    mine = TaskResult(1, 0, Generations(["c0"], 12, 1.5), ("t0: wrong",), (False,))
    joined = join_tasks(split, rows, mine, rest)
    assert joined.outcomes == (False, False, True) and (joined.examples, joined.passed) == (3, 1)
    assert joined.generations.texts == ["c0", "s2", "s3"] and joined.generations.tokens == 32
    assert pick_generations(Generations(["a", "b"], 10, 1.0), [False, False]) == Generations([], 0, 0.0)


def test_the_router_is_part_of_the_adapters_identity(tmp_path: Path, tiny_model_dir: Path) -> None:  # noqa: F811
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)),
                           LoraConfig(r=2, target_modules=["q_proj"]))
    plain, plain_folder = store_adapter(model, tmp_path, {"run_id": "r"})
    router = Router(axis_embed(SHOP), axis_embed(GENERAL_PROMPTS))
    routed_digest, folder = store_adapter(model, tmp_path, {"run_id": "r"}, router)
    assert routed_digest != plain and Router.load(plain_folder) is None and same(Router.load(folder), router)
    assert verify_adapter(routed_digest)(folder) is None and verify_adapter(plain)(plain_folder) is None
    (plain_folder / ROUTER_FILE).write_bytes(router.to_bytes())  # a router added to a stored folder
    assert "hash" in (verify_adapter(plain)(plain_folder) or "")
    (folder / ROUTER_FILE).write_bytes(Router(axis_embed(GENERAL_PROMPTS), axis_embed(SHOP)).to_bytes())
    assert "hash" in (verify_adapter(routed_digest)(folder) or "")


def test_runtimes_that_cannot_route_refuse_an_adapter_with_a_router(tmp_path: Path) -> None:
    refuse_router(tmp_path, "llama_cpp")  # no router: nothing to refuse
    (tmp_path / ROUTER_FILE).write_bytes(Router(axis_embed(SHOP), axis_embed(GENERAL_PROMPTS)).to_bytes())
    with pytest.raises(RuntimeUnavailable, match="transformers"):
        refuse_router(tmp_path, "llama_cpp")


# --------------------------------------------------------------------------- the gate and the server


def test_the_gate_measures_a_routed_adapter_as_served(
    tmp_path: Path, formatter: Any, knowing_base: Path, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    """An adapter trained on wrong answers to the role's prompts, with the general prompts as its rehearsal: the
    general rows go to the base model, so the candidate's figures on them are the model in service's (measured
    once, not again with the adapter); the role's rows go to the adapter, which forgot them and is refused."""
    settings = eval_settings(tmp_path, knowing_base)
    digest, folder = write_eval_dataset(settings.state_dir, formatter, WRONG, "routed")
    with (folder / "train.jsonl").open("ab") as fh:  # the self-synthesized rehearsal: general prompts
        for i, (p, c) in enumerate(GENERAL):
            fh.write(orjson.dumps({**formatter.conversation(p, c), "id": f"ssr{i}", "rehearsal": True,
                                   "source": "synthetic"}) + b"\n")
    done = train_dataset(settings, "coder", digest, folder)
    assert isinstance(done, TrainingCompleted), done
    router = Router.load(Path(done.path))
    assert router is not None and router.general.shape == (len(GENERAL), DIM)

    measured: list[str] = []
    real = evaluator.answer_losses

    def recording(model: Any, tokenizer: Any, rows: Any, *args: Any) -> Any:
        measured.extend(str(r["id"]) for r in rows)
        return real(model, tokenizer, rows, *args)

    monkeypatch.setattr(evaluator, "answer_losses", recording)
    outcome = evaluate_run(settings, done)
    cand, base = outcome.candidate, outcome.baseline
    assert cand["routed"] is True
    general_ids = [f"general-{n}" for n in range(1, len(GENERAL) + 1)]
    assert all(measured.count(i) == 1 for i in general_ids), measured  # the service's losses, taken once
    assert all(measured.count(f"forgetting{i}") == 2 for i in range(len(WRONG)))  # the role's: both models
    assert cand["forgetting_rate_general"] == 0.0  # the base model's own losses
    assert cand["forgetting_rate_tasks"] is not None and cand["forgetting_rate_tasks"] >= 0.3
    assert not outcome.passed and "forgetting rate" in " ".join(outcome.reasons)
    assert cand["tasks_to_adapter"] == cand["task_examples"] == base["task_examples"]

    # the same adapter in service, routed too: both measured as served (the rows routed away with the adapter off,
    # two adapters loaded), so the candidate is measured equal to it
    against_itself = evaluate_run(settings, done, service=Path(done.path))
    assert against_itself.baseline["routed"] is True and against_itself.candidate["routed"] is True
    assert against_itself.candidate["forgetting_rate"] == 0.0
    for key in ("task_passed", "suite_passed", "held_out_loss"):
        assert against_itself.candidate[key] == against_itself.baseline[key], key


@needs_tokenizer
def test_the_server_answers_what_the_router_sends_away_with_the_base_model(tmp_path: Path) -> None:
    from flywheel_loop.plugins.shared.chat_format import load_formatter

    tiny = make_tiny_model(tmp_path / "tiny", load_formatter(None, tmp_path / "tokenizers").tokenizer)
    random_adapter(tiny, tmp_path / "adapter")
    plain = context_heavy(load_chat_model(tiny, tmp_path / "adapter", "plain"))  # no router: merged, adapter always
    base = context_heavy(load_chat_model(tiny, None, "base"))
    router = Router(axis_embed(["shop work"]), axis_embed(["other"]))
    (tmp_path / "adapter" / ROUTER_FILE).write_bytes(router.to_bytes())
    served = load_chat_model(tiny, tmp_path / "adapter", "routed", state_dir=tmp_path)
    served.embed = axis_embed
    with torch.no_grad():  # scaled as the merged copy is: every weight, so the adapter's product too (B only)
        for name, param in served.model.named_parameters():
            if param.dim() == 2 and "lora_A" not in name:
                param.mul_(5.0)
    shop = [{"role": "user", "content": "shop: write the price label"}]
    other = [{"role": "user", "content": "write the price label"}]
    assert served.to_adapter(shop) and not served.to_adapter(other)
    assert plain.complete(shop, 12, 0.0) != base.complete(shop, 12, 0.0)  # the adapter changes the answer
    assert served.complete(shop, 12, 0.0) == plain.complete(shop, 12, 0.0)
    assert served.complete(other, 12, 0.0) == base.complete(other, 12, 0.0)
    assert "".join(served.stream(other, 12, 0.0, {})) == base.complete(other, 12, 0.0)[0]

    answers: dict[str, Any] = {}

    def ask(key: str, messages: list[dict[str, str]]) -> None:
        answers[key] = served.complete(messages, 12, 0.0)

    with served.lock:  # both queued while busy: each batcher answers its own
        threads = [threading.Thread(target=ask, args=a) for a in (("shop", shop), ("other", other))]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while (len(served.batcher._queue), len(served.base_batcher._queue)) != (1, 1) and time.monotonic() < deadline:
            time.sleep(0.005)
        assert (len(served.batcher._queue), len(served.base_batcher._queue)) == (1, 1)
    for thread in threads:
        thread.join(timeout=60)
    assert answers == {"shop": plain.complete(shop, 12, 0.0), "other": base.complete(other, 12, 0.0)}


def test_an_embedding_model_that_cannot_load_means_no_router_not_a_lost_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from flywheel_loop.plugins.shared import routing
    from flywheel_loop.plugins.training.trainer import fit_router

    (tmp_path / "broken").mkdir()  # a folder without a model in it
    for folder in (tmp_path / "missing", tmp_path / "broken"):
        monkeypatch.setattr(routing, "EMBEDDING", EmbeddingConfig(precision="float32", model_dir=folder))
        with pytest.raises(RouterUnusable, match="embedding model"):
            router_embedder(tmp_path)
        rows = [row(SHOP[0]), row(GENERAL_PROMPTS[0], "synthetic")]
        with caplog.at_level("WARNING"):
            assert fit_router(rows, 1) is None
        assert "no router" in caplog.text
