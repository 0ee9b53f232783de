"""Benchmark: curation (embedding, k-means diversity selection, dataset build), each next to a
baseline measured in the same run.

- **embedding**: prompts/s through ``TextEmbedder`` (batched, shape-stable), at 1 thread and at
  every core, next to sentence-transformers ``encode`` one text at a time (the naive way) and
  ``encode`` batched.
- **selection**: ``select_diverse`` (numpy k-means, ``--k`` clusters, nearest row to each
  centroid) on ``--vectors`` random unit 384-d vectors, next to scikit-learn ``KMeans`` with
  the same k and the same number of Lloyd iterations on the same numpy array.
- **build**: ``fold_log`` + ``build_dataset`` + writing the folder from ``--interactions``
  synthetic scored interactions (events already parsed, vectors given: the pure build, no NATS,
  no embedding), with the bundled SmolLM2 chat template; next to it, the near-duplicate step
  done by comparing every pair (the naive way) on the same vectors, with the recall of the
  blocked search against it.

    bash ops/bench/curate [--json] [--vectors 100000] [--k 1000] [--interactions 100000] [--quick]

Targets on the 2-core machine: embedding >= 300 interactions/s, selection < 10 s, build < 60 s.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from flywheel_loop.plugins.curation.dedupe import EXACT_LIMIT, near_duplicate_pairs  # noqa: E402
from flywheel_loop.plugins.curation.recipe import BuiltDataset, Example, build_dataset, fold_log  # noqa: E402
from flywheel_loop.plugins.curation.rehearsal import select_diverse  # noqa: E402
from flywheel_loop.plugins.curation.settings import CurationConfig  # noqa: E402
from flywheel_loop.plugins.curation.store import write_dataset  # noqa: E402
from flywheel_loop.plugins.curation.vectors import TextEmbedder  # noqa: E402
from flywheel_loop.plugins.shared.chat_format import load_formatter  # noqa: E402
from flywheel_loop.schemas import (  # noqa: E402
    DatasetBuilt,
    FeedbackAnonymized,
    FeedbackGiven,
    InteractionAnonymized,
    InteractionRecorded,
    QualityAssessed,
    new_event,
    new_id,
)

VERBS = ["Write", "Implement", "Refactor", "Fix", "Explain", "Optimise", "Test", "Document", "Review", "Port"]
THINGS = ["a function", "a class", "a CLI", "an endpoint", "a SQL query", "a regex", "a parser", "a cache",
          "a retry loop", "a migration", "a unit test", "a Dockerfile", "a React hook", "a bash script"]
GOALS = ["that deduplicates {x} by id", "that parses {x} from a CSV file", "that streams {x} to S3",
         "that validates {x} against a JSON schema", "that paginates {x}", "that groups {x} by day",
         "that retries failed {x} with back-off", "that merges two lists of {x}", "that sorts {x} stably",
         "that caches {x} for five minutes"]
NOUNS = ["orders", "invoices", "users", "sessions", "log lines", "metrics", "events", "tickets", "payments",
         "comments", "files", "jobs"]
DETAIL = ["Keep", "it", "small", "and", "typed,", "handle", "the", "empty", "case,", "and", "raise", "a", "clear",
          "error", "when", "the", "input", "is", "malformed.", "The", "code", "base", "uses", "Python", "3.11."]


def prompt(rng: random.Random) -> str:
    text = f"{rng.choice(VERBS)} {rng.choice(THINGS)} {rng.choice(GOALS).format(x=rng.choice(NOUNS))}."
    return text + " " + " ".join(DETAIL[: rng.randint(0, len(DETAIL))])


def rate(fn: Any, n: int) -> float:
    started = time.perf_counter()
    fn()
    return n / (time.perf_counter() - started)


def bench_embedding(n: int, naive_n: int) -> dict[str, Any]:
    import torch

    rng = random.Random(1)
    texts = [prompt(rng) for _ in range(n)]
    out: dict[str, Any] = {}
    cores = os.cpu_count() or 1
    by_threads = {}
    for threads in sorted({1, cores}):
        embedder = TextEmbedder(CurationConfig(embedding={"threads": threads}).embedding)
        embedder.embed(texts[:32])  # load and warm up
        by_threads[threads] = rate(lambda e=embedder: e.embed(texts), n)
    best = max(by_threads, key=lambda t: by_threads[t])
    fp32 = TextEmbedder(CurationConfig(embedding={"threads": best, "precision": "float32"}).embedding)
    fp32.embed(texts[:32])
    out["embed_fp32_per_s"] = rate(lambda: fp32.embed(texts), n)
    model = TextEmbedder()._load()
    tokens = [len(ids) for ids in model.tokenizer(texts[:500], truncation=True, max_length=128)["input_ids"]]
    torch.set_num_threads(best)
    naive = texts[:naive_n]
    out["embed_baseline_one_at_a_time_per_s"] = rate(lambda: [model.encode([t]) for t in naive], len(naive))
    out["embed_st_batched_per_s"] = rate(lambda: model.encode(texts, batch_size=64), n)
    out.update(
        embed_per_s=by_threads[best],
        embed_per_s_by_threads={str(k): round(v, 1) for k, v in by_threads.items()},
        embed_best_threads=best,
        embed_texts=n,
        embed_mean_tokens=round(float(np.mean(tokens)), 1),
    )
    return out


def bench_selection(n: int, k: int, iterations: int = 5) -> dict[str, Any]:
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 384)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    started = time.perf_counter()
    picked = select_diverse(x, k, seed=0, iterations=iterations)
    ours = time.perf_counter() - started
    started = time.perf_counter()
    km = KMeans(n_clusters=k, n_init=1, max_iter=iterations, random_state=0).fit(x)
    dist = ((x - km.cluster_centers_[km.labels_]) ** 2).sum(1)
    order = np.lexsort((dist, km.labels_))
    first = np.r_[True, km.labels_[order][1:] != km.labels_[order][:-1]]
    base = time.perf_counter() - started
    return {
        "select_100k_s": ours,
        "select_baseline_sklearn_s": base,
        "select_vectors": n,
        "select_k": k,
        "select_iterations": iterations,
        "select_picked": int(len(picked)),
        "select_baseline_picked": int(first.sum()),
    }


def synthetic_log(n: int, seed: int = 0) -> tuple[list[tuple[int, Any]], dict[str, np.ndarray], int]:
    """(sequence, event) pairs for ``n`` scored coder interactions, and their prompt vectors."""
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    domains = ["web", "data", "infra", "ml", "cli"]
    complexities = ["simple", "moderate", "complex", "expert"]
    vectors = nrng.standard_normal((n, 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    events: list[tuple[int, Any]] = []
    seq = 0
    previous_at = int(n * 0.6)
    texts: list[tuple[str, str]] = []
    by_id: dict[str, np.ndarray] = {}
    for i in range(n):
        if i and rng.random() < 0.02:  # an exact duplicate of an earlier interaction
            p, o = texts[rng.randrange(len(texts))]
        else:
            p, o = prompt(rng), f"def solution_{i}(items):\n    return sorted(set(items))  # {rng.random():.6f}"
        texts.append((p, o))
        if i and rng.random() < 0.02:  # a near-duplicate prompt vector
            v = vectors[rng.randrange(i)] + 0.01 * nrng.standard_normal(384).astype(np.float32)
            vectors[i] = v / np.linalg.norm(v)
        rec = InteractionRecorded(session_id="anon-s", role="coder", model_id="m", input=p, output=o,
                                  domain=rng.choice(domains), complexity=rng.choice(complexities))
        anon = new_event(InteractionAnonymized(interaction_id=new_id(), interaction=rec), source="anonymizer")
        by_id[anon.data.interaction_id] = vectors[i]
        seq += 1
        events.append((seq, anon))
        reward = rng.uniform(0.4, 1.0)
        seq += 1
        events.append((seq, new_event(QualityAssessed(
            interaction_id=anon.data.interaction_id, role="coder", complexity=rec.complexity, domain=rec.domain,
            scores={"x": reward}, reward=reward, confidence=1.0), source="scoring", cause=anon)))
        if rng.random() < 0.05:
            seq += 1
            fb = FeedbackGiven(interaction_id=anon.data.interaction_id, correction=o + "\n# corrected")
            events.append((seq, new_event(FeedbackAnonymized(feedback_id=new_id(), feedback=fb), source="anonymizer")))
        if i == previous_at:
            seq += 1
            events.append((seq, new_event(DatasetBuilt(role="coder", dataset_hash="0" * 64, sizes={}, path="x",
                                                       log_position=seq - 1), source="dataset_builder")))
    return events, by_id, seq


def bench_build(n: int, cache: Path, naive_pairs: bool) -> dict[str, Any]:
    events, by_id, position = synthetic_log(n)
    curation = CurationConfig()
    formatter = load_formatter(None, cache)
    formatter.conversation("warm", "up")

    def vectors(examples: list[Example]) -> np.ndarray:
        return np.stack([by_id[e.interaction_id] for e in examples])

    started = time.perf_counter()
    evidence = fold_log(events, "coder", curation, position)
    built = build_dataset(evidence, curation, formatter, vectors)
    assert isinstance(built, BuiltDataset), built
    with tempfile.TemporaryDirectory() as tmp:
        digest, folder = write_dataset(built, Path(tmp))
        size = sum(p.stat().st_size for p in folder.iterdir())
    took = time.perf_counter() - started
    out: dict[str, Any] = {
        "build_100k_s": took,
        "build_interactions": n,
        "build_sizes": built.sizes,
        "build_bytes": size,
        "build_rehearsal_share": round(built.rehearsal_share, 4),
    }
    x = np.stack([by_id[e.interaction_id] for e in evidence.examples])
    started = time.perf_counter()
    blocked = near_duplicate_pairs(x, curation.dataset.near_duplicate_threshold)
    out["dedupe_blocked_s"] = time.perf_counter() - started
    out["dedupe_vectors"] = len(x)
    if naive_pairs and len(x) > EXACT_LIMIT:
        import flywheel_loop.plugins.curation.dedupe as dedupe

        limit = dedupe.EXACT_LIMIT
        dedupe.EXACT_LIMIT = len(x)  # compare every pair
        try:
            started = time.perf_counter()
            exact = near_duplicate_pairs(x, curation.dataset.near_duplicate_threshold)
            out["dedupe_baseline_all_pairs_s"] = time.perf_counter() - started
        finally:
            dedupe.EXACT_LIMIT = limit
        found = {tuple(p) for p in blocked.tolist()}
        truth = {tuple(p) for p in exact.tolist()}
        out["dedupe_blocked_recall"] = round(len(found & truth) / max(1, len(truth)), 4)
        out["dedupe_pairs"] = len(truth)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--texts", type=int, default=2000, help="prompts embedded by the batched path")
    ap.add_argument("--naive", type=int, default=200, help="prompts embedded one at a time (baseline)")
    ap.add_argument("--vectors", type=int, default=100_000)
    ap.add_argument("--k", type=int, default=1000, help="rows selected (k-means clusters)")
    ap.add_argument("--interactions", type=int, default=100_000)
    ap.add_argument("--skip-all-pairs", action="store_true", help="skip the all-pairs dedupe baseline")
    ap.add_argument("--quick", action="store_true", help="small sizes, to check the script runs")
    args = ap.parse_args()
    if args.quick:
        args.texts, args.naive, args.vectors, args.k, args.interactions = 200, 20, 5000, 100, 3000
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        result.update(bench_embedding(args.texts, args.naive))
        result.update(bench_selection(args.vectors, args.k))
        result.update(bench_build(args.interactions, Path(tmp) / "cache", not args.skip_all_pairs))
    result["targets"] = {"embed_per_s": ">= 300", "select_100k_s": "< 10", "build_100k_s": "< 60"}
    result["met"] = {
        "embed_per_s": result["embed_per_s"] >= 300,
        "select_100k_s": result["select_100k_s"] < 10,
        "build_100k_s": result["build_100k_s"] < 60,
    }
    rounded = {k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}
    if args.json:
        print(json.dumps(rounded))
        return 0
    print(f"embedding   {result['embed_per_s']:8.1f} prompts/s at {result['embed_best_threads']} threads "
          f"(by threads {result['embed_per_s_by_threads']}; mean {result['embed_mean_tokens']} tokens)   "
          f"baseline one at a time {result['embed_baseline_one_at_a_time_per_s']:.1f}/s, "
          f"sentence-transformers batched {result['embed_st_batched_per_s']:.1f}/s   target >= 300")
    print(f"selection   {result['select_100k_s']:8.2f} s for k={args.k} of {args.vectors} vectors   "
          f"baseline scikit-learn KMeans {result['select_baseline_sklearn_s']:.2f} s   target < 10 s")
    print(f"build       {result['build_100k_s']:8.2f} s for {args.interactions} interactions "
          f"(train {result['build_sizes']['train']}, rehearsal {result['build_sizes']['rehearsal']})   "
          f"target < 60 s")
    if "dedupe_baseline_all_pairs_s" in result:
        print(f"near-dups   {result['dedupe_blocked_s']:8.2f} s blocked over {result['dedupe_vectors']} vectors   "
              f"baseline all pairs {result['dedupe_baseline_all_pairs_s']:.2f} s   "
              f"recall {result['dedupe_blocked_recall']:.2%} of {result['dedupe_pairs']} pairs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
