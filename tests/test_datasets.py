"""Curated datasets: duplicates, balance, rehearsal, exact replay, no leaks, clear refusals.

The embedding model is loaded once per session (``plugins.vectors.shared_embedder`` keeps it);
tests that only need distinct vectors use a stand-in vector source to stay fast.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from flywheel_loop.engine.bus import Bus
from flywheel_loop.engine.config import Settings
from flywheel_loop.engine.hookspecs import hookimpl
from flywheel_loop.engine.plugin_host import PluginHost
from flywheel_loop.engine.processor import ProcessContext
from flywheel_loop.plugins.curation.builder import DatasetBuilder, DatasetNotBuilt, build_from_log, rebuild_dataset
from flywheel_loop.plugins.curation.recipe import BuiltDataset, Evidence, Example, Skip, build_dataset, fold_log
from flywheel_loop.plugins.curation.rehearsal import rehearsal_count, select_diverse
from flywheel_loop.plugins.curation.settings import CurationConfig
from flywheel_loop.plugins.curation.store import export_dataset, list_datasets, load_dataset_dict, show_dataset
from flywheel_loop.plugins.curation.vectors import TextEmbedder, VectorStore, shared_embedder
from flywheel_loop.plugins.shared.chat_format import ChatFormatter, load_formatter
from flywheel_loop.plugins.shared.code import in_answer_form
from flywheel_loop.plugins.shared.datasets import read_manifest
from flywheel_loop.plugins.shared.training_requests import request_training
from flywheel_loop.schemas import (
    Event,
    FeedbackAnonymized,
    FeedbackGiven,
    InteractionAnonymized,
    InteractionRecorded,
    OutcomeObserved,
    QualityAssessed,
    TrainingRequested,
    new_event,
    new_id,
)
from tests import planted_corpus as pc
from tests.conftest import read_log, wait_for

DATASET = {"min_examples": 2, "forgetting_share": 0.0, "validation_share": 0.2}


@pytest.fixture
def settings(settings_with: Callable[..., Settings]) -> Settings:
    return settings_with(curation={"dataset": DATASET, "embedding": {"flush_s": 0.2}})


@pytest.fixture(scope="module")
def embedder() -> TextEmbedder:
    model = shared_embedder(CurationConfig().embedding)
    model.embed(["warm up"])
    return model


@pytest.fixture(scope="module")
def formatter(tmp_path_factory: pytest.TempPathFactory) -> ChatFormatter:
    return load_formatter(None, tmp_path_factory.mktemp("cache"))


# --------------------------------------------------------------------------- helpers


def curation(**dataset: Any) -> CurationConfig:
    return CurationConfig(dataset={**DATASET, **dataset})


def example(n: int, prompt: str, reward: float = 0.9, domain: str = "web", complexity: str = "moderate",
            seq: int | None = None, correction: str | None = None) -> Example:
    eid = f"01J{n:023d}"
    return Example(
        interaction_id=eid, event_id=eid, score_id=f"01K{n:023d}", feedback_id=f"01M{n:023d}" if correction else None,
        seq=seq if seq is not None else 1000 + n, role="coder", domain=domain, complexity=complexity,
        prompt=prompt, output=f"answer to {prompt}", correction=correction, reward=reward,
    )


def evidence(examples: list[Example], previous: int = 0) -> Evidence:
    return Evidence(role="coder", position=10_000, previous_position=previous, interactions=len(examples),
                    scored=len(examples), examples=examples)


def one_hot(examples: list[Example]) -> np.ndarray:
    """Distinct, orthogonal vectors: no two examples are near-duplicates."""
    out = np.zeros((len(examples), 384), dtype=np.float32)
    for i, e in enumerate(examples):
        out[i, int(e.interaction_id[3:]) % 384] = 1.0
    return out


def real_vectors(embedder: TextEmbedder) -> Callable[[list[Example]], np.ndarray]:
    return lambda examples: embedder.embed([e.prompt for e in examples])


TASKS = [
    "Write a Python function that reverses a string.",
    "Parse a CSV file and return the sum of the second column.",
    "Implement binary search over a sorted list of integers.",
    "Explain what a Python decorator is, with an example.",
    "Fix the off-by-one error in this for loop over an array.",
    "Write a SQL query that lists the ten most recent orders.",
    "Add type hints to this function that merges two dictionaries.",
    "Write a unit test for the slugify function.",
    "Convert this callback-based Node.js code to async/await.",
    "Write a bash script that deletes log files older than a week.",
    "Explain the difference between a process and a thread.",
    "Refactor this class to use dataclasses instead of __init__ boilerplate.",
    "Write a regular expression that matches ISO 8601 dates.",
    "Implement an LRU cache with a fixed capacity.",
    "Write a Dockerfile for a small Flask application.",
    "Find the memory leak in this C function that builds a linked list.",
]


def anonymized(prompt: str, output: str, domain: str = "web", complexity: str = "moderate",
               role: str = "coder") -> Event[Any]:
    rec = InteractionRecorded(session_id="anon-1", role=role, model_id="m", input=prompt, output=output,
                              domain=domain, complexity=complexity)
    return new_event(InteractionAnonymized(interaction_id=new_id(), interaction=rec), source="anonymizer")


def scored(interaction: Event[Any], reward: float) -> Event[Any]:
    d = interaction.data
    rec = d.interaction
    return new_event(
        QualityAssessed(interaction_id=d.interaction_id, role=rec.role, complexity=rec.complexity,
                        domain=rec.domain, scores={"x": reward}, reward=reward, confidence=1.0),
        source="scoring", cause=interaction,
    )


def corrected(interaction: Event[Any], text: str) -> Event[Any]:
    return new_event(
        FeedbackAnonymized(feedback_id=new_id(),
                           feedback=FeedbackGiven(interaction_id=interaction.data.interaction_id, correction=text)),
        source="anonymizer", cause=interaction,
    )


async def built_or_skipped(bus: Bus, n: int) -> list[Event[Any]]:
    async def done() -> list[Event[Any]] | None:
        found = await read_log(bus, "log", "dataset.built") + await read_log(bus, "log", "dataset.skipped")
        return sorted(found, key=lambda e: e.id) if len(found) >= n else None

    return await wait_for(done, timeout=60)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def dataset_folders(settings: Settings) -> list[Path]:
    root = settings.state_dir / "datasets"
    return sorted(root.iterdir()) if root.exists() else []


# --------------------------------------------------------------------------- the recipe


def test_planted_near_duplicates_and_exact_duplicates_are_removed(
    embedder: TextEmbedder, formatter: ChatFormatter
) -> None:
    distinct = TASKS[:6]
    planted = [
        ("write a python function that reverses a string", 0.95),  # case and punctuation, better reward
        ("Write a Python function that reverses a  string!", 0.8),
        ("Please write a Python function that reverses a string.", 0.85),
        ("parse a csv file and return the sum of the second column", 0.75),
    ]
    examples = [example(i, p, reward=0.9) for i, p in enumerate(distinct)]
    examples += [example(10 + i, p, reward=r) for i, (p, r) in enumerate(planted)]
    examples.append(example(20, distinct[3], reward=0.8))  # the same prompt and answer again
    built = build_dataset(evidence(examples), curation(validation_share=0.0), formatter, real_vectors(embedder))
    assert isinstance(built, BuiltDataset)
    prompts = sorted(r["messages"][0]["content"] for r in built.splits["train"])
    expected = sorted([planted[0][0], *distinct[1:]])  # the reverse-a-string group keeps its best
    assert prompts == expected
    assert built.sizes["duplicates"] == 1 and built.sizes["near_duplicates"] == 4


def test_balance_caps_hold_per_cell_and_are_reported(formatter: ChatFormatter) -> None:
    cells = {("web", "simple"): 5, ("web", "complex"): 2, ("data", "moderate"): 4}
    examples, n = [], 0
    for (domain, complexity), count in cells.items():
        for i in range(count):
            examples.append(example(n, f"task {n}", reward=0.8 + i / 100, domain=domain, complexity=complexity))
            n += 1
    built = build_dataset(evidence(examples), curation(max_per_cell=3, validation_share=0.0), formatter, one_hot)
    assert isinstance(built, BuiltDataset)
    table = {(r.domain, r.complexity): (r.available, r.kept) for r in built.balance}
    assert table == {("web", "simple"): (5, 3), ("web", "complex"): (2, 2), ("data", "moderate"): (4, 3)}
    rows = built.splits["train"]
    for (domain, complexity), (_, kept) in table.items():
        members = [r for r in rows if (r["domain"], r["complexity"]) == (domain, complexity)]
        assert len(members) == kept
        # the best rewards of the cell are the ones kept
        best = sorted((e.reward for e in examples if e.cell == (domain, complexity)), reverse=True)[:kept]
        assert sorted((r["reward"] for r in members), reverse=True) == best
    assert built.sizes["capped"] == 3


def test_rehearsal_share_is_exact_and_its_rows_are_diverse_and_tagged(formatter: ChatFormatter) -> None:
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((3, 384)).astype(np.float32)
    sizes = [50, 7, 3]  # a random pick of 3 would mostly come from the first cluster
    past = [example(n, f"past {n}", seq=5) for n in range(sum(sizes))]
    cluster_of = {e.interaction_id: c for e, c in zip(past, np.repeat(np.arange(3), sizes), strict=True)}
    new = [example(100 + n, f"new {n}", seq=50) for n in range(17)]

    def vectors(examples: list[Example]) -> np.ndarray:
        out = one_hot(examples)
        for i, e in enumerate(examples):
            if e.interaction_id in cluster_of:
                v = centres[cluster_of[e.interaction_id]] + 0.05 * rng.standard_normal(384).astype(np.float32)
                out[i] = v / np.linalg.norm(v)
        return out

    built = build_dataset(evidence(past + new, previous=10), curation(validation_share=0.0), formatter, vectors)
    assert isinstance(built, BuiltDataset)
    train = built.splits["train"]
    rehearsal = [r for r in train if r["rehearsal"]]
    assert len(train) - len(rehearsal) == 17
    assert len(rehearsal) == rehearsal_count(0.15, 17) == 3
    assert built.rehearsal_share == 0.15 == len(rehearsal) / len(train)
    assert {cluster_of[r["id"]] for r in rehearsal} == {0, 1, 2}
    assert all(r["id"] in cluster_of for r in rehearsal) and not any(r["id"] in cluster_of for r in train
                                                                    if not r["rehearsal"])


def test_rehearsal_count_rounds_half_up_exactly() -> None:
    assert rehearsal_count(0.15, 85) == 15  # 15 / 100
    assert rehearsal_count(0.15, 17) == 3  # 3 / 20
    assert rehearsal_count(0.15, 10) == 2  # 1.76 -> 2
    assert rehearsal_count(0.2, 2) == 1  # 0.5 -> 1 (half up)
    assert rehearsal_count(0.0, 100) == 0 and rehearsal_count(0.15, 0) == 0


def test_the_diverse_selection_covers_more_clusters_than_a_random_sample() -> None:
    rng = np.random.default_rng(0)
    k = 30
    sizes = [max(3, int(2000 / (r + 1))) for r in range(k)]  # a long tail of small clusters
    centres = rng.standard_normal((k, 384)).astype(np.float32)
    labels = np.repeat(np.arange(k), sizes)
    x = centres[labels] + 0.1 * rng.standard_normal((len(labels), 384)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    picked = select_diverse(x, k, seed=0)
    assert len(set(picked.tolist())) == k
    diverse = len(set(labels[picked].tolist()))
    randoms = [len(set(labels[np.random.default_rng(s).choice(len(x), k, replace=False)].tolist())) for s in range(5)]
    assert diverse > max(randoms), (diverse, randoms)
    assert np.array_equal(picked, select_diverse(x, k, seed=0))  # seeded: the same rows again


def test_embeddings_do_not_depend_on_the_batch_they_are_computed_in(embedder: TextEmbedder) -> None:
    texts = TASKS[:9]
    together = embedder.embed(texts)
    alone = np.stack([embedder.embed([t])[0] for t in texts])
    shuffled = embedder.embed(texts[::-1] + ["a much longer prompt " * 20])[: len(texts)][::-1]
    assert np.array_equal(together, alone) and np.array_equal(together, shuffled)
    assert np.allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)


def test_the_vectors_name_says_every_size_that_shapes_them(embedder: TextEmbedder) -> None:
    """Padding bucket and rows a pass change a vector's last bits: each names its own table."""
    base = embedder.config
    keys = {TextEmbedder(base.model_copy(update=change), embedder.cache_dir).key
            for change in ({}, {"rows": 8}, {"bucket_tokens": 1}, {"max_tokens": 64})}
    assert len(keys) == 4 and embedder.key in keys
    assert TextEmbedder(base.model_copy(update={"batch": 7}), embedder.cache_dir).key == embedder.key


def test_a_synthetic_rehearsal_hook_fills_the_share_when_there_is_no_past(formatter: ChatFormatter) -> None:
    new = [example(n, f"new task {n}") for n in range(17)]
    seen: list[int] = []

    def synthesize(role: str, rows: list[dict[str, Any]], wanted: int) -> list[dict[str, Any]]:
        seen.append(wanted)
        return [{"prompt": f"recall {i}", "completion": f"fact {i}"} for i in range(wanted + 2)]

    built = build_dataset(evidence(new), curation(validation_share=0.0), formatter, one_hot, synthesize)
    assert isinstance(built, BuiltDataset)
    synthetic = [r for r in built.splits["train"] if r["source"] == "synthetic"]
    assert seen == [3] and len(synthetic) == 3 and all(r["rehearsal"] for r in synthetic)
    assert built.rehearsal_share == 0.15 and synthetic[0]["text"].startswith("<|im_start|>")


# --------------------------------------------------------------------------- the builder on the log


class SyntheticRehearsal:
    """A test plugin implementing the hook."""

    @hookimpl
    def synthesize_rehearsal(self, role: str, examples: list[dict[str, Any]], wanted: int,
                             settings: Settings) -> list[dict[str, Any]]:
        return [{"prompt": f"what does {role} know? {i}", "completion": f"item {i}"} for i in range(wanted)]


async def test_replay_gives_the_same_hash_and_bytes_after_the_state_folder_is_deleted(
    bus: Bus, engine_with: Any, settings: Settings, embedder: TextEmbedder, tmp_path: Path
) -> None:
    first = [anonymized(t, f"def solution_{i}(): ...", domain=["web", "data"][i % 2]) for i, t in enumerate(TASKS[:8])]
    second = [anonymized(t, f"def solution_{i}(): ...", domain=["web", "data"][i % 2])
              for i, t in enumerate(TASKS[8:], 8)]
    async with engine_with(SyntheticRehearsal(), only={"embedder", "dataset_builder"}):
        for i, event in enumerate(first):
            await bus.publish(event)
            await bus.publish(scored(event, 0.9 if i != 5 else 0.3))
        await bus.publish(corrected(first[5], "def solution_5():\n    return 'corrected'"))
        one = await request_training(bus, "coder")
        [built1] = await built_or_skipped(bus, 1)
        for event in second:
            await bus.publish(event)
            await bus.publish(scored(event, 0.8))
        two = await request_training(bus, "coder")
        _, built2 = await built_or_skipped(bus, 2)
        store = VectorStore(settings.layout.vectors,
                            shared_embedder(CurationConfig.of(settings).embedding, settings.state_dir).key)
        await wait_for(lambda: store.count() == 16, timeout=120)  # every anonymized prompt was embedded

    assert built1.type == built2.type == "dataset.built", (built1.data, built2.data)
    b1, b2 = built1.data, built2.data
    assert b1.request_id == one.id and b1.log_position == one.data.log_position
    assert b2.log_position == two.data.log_position
    m1, m2 = read_manifest(Path(b1.path)), read_manifest(Path(b2.path))
    assert m1["previous_position"] == 0 and m2["previous_position"] == b1.log_position
    # the manifest records the precision the vectors were computed in (the probe's choice, cached)
    assert m1["embedding"]["precision"] == m2["embedding"]["precision"] in ("bfloat16", "float32")
    chosen = json.loads((settings.state_dir / "precision.json").read_text())["cpu"]["chosen"]
    assert m1["embedding"]["precision"] == {"bf16": "bfloat16", "fp32": "float32"}[chosen]
    # the first dataset has no past: its rehearsal is the hook's; the second rehearses the first's rows
    assert b1.sizes["synthetic"] == b1.sizes["rehearsal"] > 0
    assert b2.sizes["rehearsal"] == rehearsal_count(0.15, b2.sizes["train"] - b2.sizes["rehearsal"]) > 0
    assert b2.sizes["synthetic"] == 0
    rows2 = [orjson.loads(line) for line in (Path(b2.path) / "train.jsonl").read_bytes().splitlines()]
    first_ids = {e.data.interaction_id for e in first}
    assert {r["id"] for r in rows2 if r["rehearsal"]} <= first_ids
    # the correction became the target and a DPO pair
    dpo = [orjson.loads(line) for name in ("dpo_train.jsonl", "dpo_validation.jsonl")
           if (Path(b1.path) / name).exists() for line in (Path(b1.path) / name).read_bytes().splitlines()]
    [pair] = [p for p in dpo if p["id"] == first[5].data.interaction_id] or [None]
    assert pair["chosen"].endswith("'corrected'") and pair["rejected"] == "def solution_5(): ..."
    assert b1.lineage_total == len((Path(b1.path) / "lineage.txt").read_text().split())
    assert first[5].data.interaction_id not in b1.lineage  # lineage lists event ids, not raw ids
    assert first[5].id in b1.lineage

    saved = {b.dataset_hash: folder_bytes(Path(b.path)) for b in (b1, b2)}
    shutil.rmtree(settings.state_dir)
    host = PluginHost(settings, load_entry_points=False)
    host.register(SyntheticRehearsal())
    for b in (b2, b1):
        digest, path = await rebuild_dataset(settings, bus, "coder", b.log_position, host=host)
        assert digest == b.dataset_hash
        assert folder_bytes(path) == saved[b.dataset_hash]

    # Loadable with datasets, listed, shown and exported.
    from datasets import load_dataset

    folder = Path(b2.path)
    as_json = load_dataset("json", data_files={"train": str(folder / "train.jsonl")})
    assert as_json["train"].num_rows == b2.sizes["train"]
    splits = load_dataset_dict(settings, b2.dataset_hash[:10])
    assert splits["train"].num_rows == b2.sizes["train"] and "messages" in splits["train"].column_names
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(list_datasets(settings))
    for renderable in show_dataset(settings, b2.dataset_hash[:12]):
        console.print(renderable)
    text = console.export_text()
    assert b1.dataset_hash[:16] in text and "balance per (role, domain, complexity)" in text
    for fmt in ("jsonl", "parquet", "hf"):
        out = export_dataset(settings, b2.dataset_hash, fmt, tmp_path / f"export-{fmt}")
        assert any(out.iterdir())
    assert (tmp_path / "export-parquet" / "train.parquet").read_bytes() == saved[b2.dataset_hash]["train.parquet"]


async def test_no_dataset_row_contains_a_planted_secret(bus: Bus, engine_with: Any, settings: Settings) -> None:
    CurationConfig.of(settings).min_reward = 0.0  # keep every interaction: all of its text is in the dataset
    corpus = pc.generate(seed=21, per_kind=2, mixed=4, clean=0)
    texts = [s.text for s in corpus.samples]
    for i in range(0, len(texts) - 2, 3):
        raw = new_event(
            InteractionRecorded(session_id=f"laptop-of-maria-{i}", role="coder", model_id="m",
                                input=f"Task {i}: {texts[i]}", output=texts[i + 1], domain="web"),
            source="agent",
        )
        await bus.publish(raw)
        await bus.publish(new_event(FeedbackGiven(interaction_id=raw.id, correction=texts[i + 2], rating=4),
                                    source="agent", cause=raw))
        await bus.publish(new_event(OutcomeObserved(interaction_id=raw.id, compiles=True, tests_passed=3,
                                                    tests_failed=0), source="agent", cause=raw))
    async with engine_with(only={"anonymizer", "scoring", "embedder", "dataset_builder"}):
        await wait_for(lambda: _count(bus, "interaction.anonymized", len(texts) // 3), timeout=60)

        async def scored_all() -> bool:
            return await _idle(bus, "anonymizer", "raw") and await _idle(bus, "scoring", "log")

        await wait_for(scored_all, timeout=60)
        await request_training(bus, "coder")
        [built] = await built_or_skipped(bus, 1)
    assert built.type == "dataset.built", built.data
    folder = Path(built.data.path)
    import pyarrow.parquet as pq

    texts_out = [p.read_text() for p in folder.iterdir() if p.suffix in (".jsonl", ".json", ".txt")]
    for p in folder.glob("*.parquet"):
        texts_out.append(orjson.dumps(pq.read_table(p).to_pylist()).decode())
    blob = "\n".join(texts_out)
    assert "[" in blob and built.data.sizes["train"] >= 5
    leaks = [part for item in corpus.items for part in item.must_vanish() if pc.leaked(part, blob)]
    assert not leaks, leaks[:3]
    assert "laptop-of-maria" not in blob


async def _count(bus: Bus, event_type: str, n: int) -> bool:
    return len(await read_log(bus, "log", event_type)) >= n


async def _idle(bus: Bus, consumer: str, stream: str) -> bool:
    info = await bus.js.consumer_info(bus.streams.for_stream(stream), consumer)
    return info.num_pending == 0 and info.num_ack_pending == 0


async def test_empty_and_malformed_requests_end_with_a_reason_and_no_dataset(
    bus: Bus, engine_with: Any, settings: Settings
) -> None:
    async with engine_with(only={"dataset_builder"}):
        await request_training(bus, "coder")  # nothing on the log yet
        [empty] = await built_or_skipped(bus, 1)
        low = [anonymized(t, "meh") for t in TASKS[:3]]
        for event in low:
            await bus.publish(event)
            await bus.publish(scored(event, 0.2))
        await request_training(bus, "coder")  # interactions, none good enough
        await request_training(bus, "reviewer")  # a role with no data
        good = anonymized(TASKS[5], "def ok(): ...")
        await bus.publish(good)
        await bus.publish(scored(good, 0.95))
        await request_training(bus, "coder")  # one good example: fewer than min_examples
        bogus = new_event(TrainingRequested(role="coder", reason="manual", log_position=10_000), source="test")
        await bus.publish(bogus)  # claims a position that does not exist yet
        results = await built_or_skipped(bus, 5)
    by_reason = {e.data.reason: e.data for e in results}
    assert [e.type for e in results] == ["dataset.skipped"] * 5
    assert set(by_reason) == {"no_data", "no_examples", "too_few_examples", "invalid_request"}
    assert empty.data.reason == "no_data" and "no anonymized coder interactions" in empty.data.detail
    assert "reviewer" in [e.data.role for e in results if e.data.reason == "no_data"]
    assert "none cleared the quality bar" in by_reason["no_examples"].detail
    assert "min_examples is 2" in by_reason["too_few_examples"].detail
    assert by_reason["invalid_request"].request_id == bogus.id
    assert dataset_folders(settings) == []


async def test_an_unknown_base_model_is_a_clear_refusal_with_no_partial_folder(
    bus: Bus, settings: Settings, tmp_path: Path
) -> None:
    for t in TASKS[:4]:
        event = anonymized(t, "def f(): ...")
        await bus.publish(event)
        await bus.publish(scored(event, 0.9))
    missing = tmp_path / "no-such-model.gguf"
    other = settings.model_copy(update={"models": settings.models.model_copy(update={"base": missing})})
    outcome = await build_from_log(other, bus.read_log, "coder", await bus.last_sequence("log"))
    assert isinstance(outcome.skip, Skip) and outcome.skip.reason == "base_model_missing"
    assert str(missing) in outcome.skip.detail and "does not exist" in outcome.skip.detail
    with pytest.raises(DatasetNotBuilt, match="base_model_missing"):
        await rebuild_dataset(other, bus, "coder", await bus.last_sequence("log"),
                              host=PluginHost(other, load_entry_points=False))
    request = await request_training(bus, "coder")
    ctx = ProcessContext(settings=other, log=logging.getLogger("t"), sequence=99, reader=bus.read_log)
    [answer] = await DatasetBuilder().handle(request, ctx)
    assert answer.reason == "base_model_missing" and answer.request_id == request.id
    assert dataset_folders(other) == []
    # and with the bundled model the same log builds
    digest, path = await rebuild_dataset(settings, bus, "coder", request.data.log_position)
    assert [p.name for p in dataset_folders(settings)] == [digest]


def test_a_bare_code_correction_is_learned_in_the_answers_form() -> None:
    answer = "Here it is:\n```python\ndef total(xs):\n    return 0\n```\nIt adds them."
    fixed = "# SPDX-License-Identifier: Apache-2.0\ndef total(xs):\n    return sum(xs)\n"
    fenced = "```python\n# SPDX-License-Identifier: Apache-2.0\ndef total(xs):\n    return sum(xs)\n```"
    assert in_answer_form(fixed, answer) == fenced
    assert in_answer_form(fixed, answer.replace("```python", "```")) == fenced.replace("```python", "```")
    # kept as given: prose (even a word that parses as an expression), a fenced correction, a bare answer
    assert in_answer_form("Use sum() instead.", answer) == "Use sum() instead."
    assert in_answer_form("wrong", answer) == "wrong"
    assert in_answer_form(fenced, answer) == fenced
    assert in_answer_form(fixed, "def total(xs):\n    return 0") == fixed
    assert in_answer_form("let x = 1;", answer) == "let x = 1;"  # not Python
    # the Python block's tag, not another block's; a closing fence opens nothing
    js = "```js\nlet total = 0;\n```\n"
    assert in_answer_form(fixed, js) == fixed
    assert in_answer_form(fixed, "```bash\npip install x\n```\nthen:\n```python\npass\n```") == fenced
    # too deep for the parser: kept as given, never an error that would stop the role's builds
    deep = "x = " + " + ".join(["1"] * 20_000)
    assert in_answer_form(deep, answer) == deep

    # the builder's evidence: the target (and the DPO pair's chosen side) is the fenced correction; off: as given
    interaction = anonymized("Sum a list", answer)
    log = list(enumerate([interaction, scored(interaction, 0.2), corrected(interaction, fixed)], start=1))
    [on] = fold_log(log, "coder", curation(), position=3).examples
    assert on.target == on.correction == fenced and on.output == answer
    [off] = fold_log(log, "coder", curation(fence_code_corrections=False), position=3).examples
    assert off.target == fixed
