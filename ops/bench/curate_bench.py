"""Benchmark: curation (embedding, k-means diversity selection, dataset build), each next to a
baseline measured in the same run.

- **roofline**: this CPU's matrix-product rate in fp32 and in bf16 (1024 x 1024 products at the
  embedder's best thread count), measured in the same run; the embedder's rate is also given as
  a share of it (2 x weights x tokens per prompt).
- **embedding**: prompts/s through ``TextEmbedder`` (batched, shape-stable) at its default
  precision (``auto``: the probe of ``plugins/shared/precision.py``), at 1 thread and at every
  core, and at fixed fp32 and bf16; next to sentence-transformers ``encode`` one text at a time
  (the naive way) and ``encode`` batched.
- **selection**: ``select_diverse`` (numpy k-means, ``--k`` clusters, nearest row to each
  centroid) on ``--vectors`` random unit 384-d vectors, next to scikit-learn ``KMeans`` doing
  the same work: started from the same initial centres (``init=``), the same number of Lloyd
  iterations (``tol=0``), on the same array; the inertia of both, and the coverage of both
  selections (mean squared distance from every row to its nearest pick; random picks for scale).
- **build**: ``fold_log`` + ``build_dataset`` + writing the folder from ``--interactions``
  synthetic scored interactions (events already parsed, vectors given: the pure build, no NATS,
  no embedding), with the bundled SmolLM2 chat template; next to it, the near-duplicate step
  done by comparing every pair (the naive way) on the same vectors, with the recall of the
  blocked search against it.

    ops/bench/curate [--json] [--vectors 100000] [--k 1000] [--interactions 100000] [--quick]

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


def roofline(threads: int) -> dict[str, float]:
    """This CPU's matrix-product rate (GFLOP/s) in fp32 and bf16 at ``threads``, measured now."""
    from flywheel_loop.plugins.shared.precision import matmul_gflops

    return {p: matmul_gflops(p, "cpu", n=1024, seconds=1.0, threads=threads) for p in ("fp32", "bf16")}


def bench_embedding(n: int, naive_n: int, cache: Path) -> dict[str, Any]:
    """The embedder at its default precision (``auto``: the probe's choice, cached in ``cache``),
    and at fp32 and bf16 each, next to sentence-transformers; with this CPU's roofline."""
    import torch

    rng = random.Random(1)
    texts = [prompt(rng) for _ in range(n)]
    out: dict[str, Any] = {}
    cores = os.cpu_count() or 1
    by_threads = {}
    chosen = "float32"
    for threads in sorted({1, cores}):
        embedder = TextEmbedder(CurationConfig(embedding={"threads": threads}).embedding, cache)
        chosen = embedder.precision
        embedder.embed(texts[:32])  # load and warm up
        by_threads[threads] = rate(lambda e=embedder: e.embed(texts), n)
    best = max(by_threads, key=lambda t: by_threads[t])
    by_precision = {}
    for name in ("float32", "bfloat16"):
        fixed = TextEmbedder(CurationConfig(embedding={"threads": best, "precision": name}).embedding, cache)
        fixed.embed(texts[:32])
        by_precision[name] = rate(lambda e=fixed: e.embed(texts), n)
    model = TextEmbedder()._load()
    tokens = [len(ids) for ids in model.tokenizer(texts, truncation=True, max_length=128)["input_ids"]]
    weights = sum(p.numel() for name, p in model.named_parameters() if "embeddings" not in name)
    flops_per_prompt = 2 * weights * float(np.mean(tokens))  # the matrix products; attention is small here
    peak = roofline(best)
    torch.set_num_threads(best)
    naive = texts[:naive_n]
    out["embed_baseline_one_at_a_time_per_s"] = rate(lambda: [model.encode([t]) for t in naive], len(naive))
    out["embed_st_batched_per_s"] = rate(lambda: model.encode(texts, batch_size=64), n)
    # the selection's coverage on real vectors: these prompts, embedded
    x = TextEmbedder(CurationConfig(embedding={"threads": best}).embedding, cache).embed(texts)
    k = max(2, n // 20)
    picked = select_diverse(x, k, seed=0)
    random_picked = np.sort(np.random.default_rng(0).choice(n, size=k, replace=False))
    out["select_real_k"] = k
    out["select_real_coverage_mean_sq_dist"] = _coverage(x, picked)["mean_sq_dist"]
    out["select_real_random_coverage_mean_sq_dist"] = _coverage(x, random_picked)["mean_sq_dist"]
    short = {"float32": "fp32", "bfloat16": "bf16"}
    out.update(
        embed_per_s=by_threads[best],
        embed_precision=short[chosen],
        embed_fp32_per_s=by_precision["float32"],
        embed_bf16_per_s=by_precision["bfloat16"],
        embed_per_s_by_threads={str(k): round(v, 1) for k, v in by_threads.items()},
        embed_best_threads=best,
        embed_texts=n,
        embed_mean_tokens=round(float(np.mean(tokens)), 1),
        embed_gflop_per_prompt=round(flops_per_prompt / 1e9, 4),
        roofline_fp32_gflops=peak["fp32"],
        roofline_bf16_gflops=peak["bf16"],
        embed_roofline_share=by_threads[best] * flops_per_prompt / 1e9 / peak[short[chosen]],
    )
    return out


def _picks(labels: np.ndarray, dist: np.ndarray, k: int) -> np.ndarray:
    """The row nearest each centre (ties: the lower index), as ``select_diverse`` picks them."""
    n = len(labels)
    order = np.lexsort((np.arange(n), dist, labels))
    first = np.ones(n, dtype=bool)
    first[1:] = labels[order][1:] != labels[order][:-1]
    return np.sort(order[first][:k])


def _coverage(x: np.ndarray, picked: np.ndarray) -> dict[str, float]:
    """How well the picked rows cover all rows: squared distance from each row to its nearest pick."""
    from flywheel_loop.plugins.curation.rehearsal import assign

    _, dist = assign(x, x[picked])
    return {"mean_sq_dist": float(dist.mean()), "p95_sq_dist": float(np.percentile(dist, 95))}


def bench_selection(n: int, k: int, iterations: int = 5) -> dict[str, Any]:
    """Ours and scikit-learn's Lloyd k-means doing the same work: the same initial centres (ours,
    k-means++ on a sample, passed to scikit-learn as ``init=``), the same number of iterations
    (``tol=0``: no early stop but on unchanged labels, as ours), the same data. Ours is timed with
    and without choosing the initial centres; the inertia of both and the coverage of both
    selections (and of a random one) are reported."""
    from sklearn.cluster import KMeans

    from flywheel_loop.plugins.curation.rehearsal import initial_centres, kmeans

    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 384)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    started = time.perf_counter()
    picked = select_diverse(x, k, seed=0, iterations=iterations)
    ours_total = time.perf_counter() - started
    started = time.perf_counter()
    init = initial_centres(x, k, seed=0)
    init_s = time.perf_counter() - started
    started = time.perf_counter()
    _, labels, dist = kmeans(x, k, iterations=iterations, init=init)
    ours_lloyd = time.perf_counter() - started
    assert np.array_equal(_picks(labels, dist, k), picked), "select_diverse differs from kmeans from its own init"
    started = time.perf_counter()
    km = KMeans(n_clusters=k, init=init, n_init=1, max_iter=iterations, tol=0.0, algorithm="lloyd").fit(x)
    base_dist = ((x - km.cluster_centers_[km.labels_]) ** 2).sum(1)
    base_picked = _picks(km.labels_, base_dist, k)
    base = time.perf_counter() - started
    random_picked = np.sort(rng.choice(n, size=k, replace=False))
    ours_cov, base_cov, rand_cov = _coverage(x, picked), _coverage(x, base_picked), _coverage(x, random_picked)
    return {
        "select_100k_s": ours_total,
        "select_init_s": init_s,
        "select_lloyd_s": ours_lloyd,
        "select_baseline_sklearn_s": base,
        "select_baseline_sklearn_iterations": int(km.n_iter_),
        "select_inertia": float(dist.sum()),
        "select_baseline_inertia": float(km.inertia_),
        "select_coverage_mean_sq_dist": ours_cov["mean_sq_dist"],
        "select_baseline_coverage_mean_sq_dist": base_cov["mean_sq_dist"],
        "select_random_coverage_mean_sq_dist": rand_cov["mean_sq_dist"],
        "select_coverage_p95_sq_dist": ours_cov["p95_sq_dist"],
        "select_baseline_coverage_p95_sq_dist": base_cov["p95_sq_dist"],
        "select_vectors": n,
        "select_k": k,
        "select_iterations": iterations,
        "select_picked": int(len(picked)),
        "select_baseline_picked": int(len(base_picked)),
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
        result.update(bench_embedding(args.texts, args.naive, Path(tmp) / "state"))
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
    print(f"roofline    {result['roofline_fp32_gflops']:8.1f} GFLOP/s fp32, {result['roofline_bf16_gflops']:.1f} bf16 "
          f"(1024x1024 matrix products at {result['embed_best_threads']} threads, this run)")
    print(f"embedding   {result['embed_per_s']:8.1f} prompts/s at {result['embed_best_threads']} threads in "
          f"{result['embed_precision']} (the probe's choice; by threads {result['embed_per_s_by_threads']}; "
          f"mean {result['embed_mean_tokens']} tokens; {result['embed_roofline_share']:.0%} of the roofline)   "
          f"fixed fp32 {result['embed_fp32_per_s']:.1f}/s, bf16 {result['embed_bf16_per_s']:.1f}/s   "
          f"baseline one at a time {result['embed_baseline_one_at_a_time_per_s']:.1f}/s, "
          f"sentence-transformers batched {result['embed_st_batched_per_s']:.1f}/s   target >= 300")
    print(f"selection   {result['select_100k_s']:8.2f} s for k={args.k} of {args.vectors} vectors "
          f"(initial centres {result['select_init_s']:.2f} s + {result['select_iterations']} Lloyd iterations "
          f"{result['select_lloyd_s']:.2f} s)   baseline scikit-learn KMeans from the same centres, same iterations "
          f"{result['select_baseline_sklearn_s']:.2f} s   target < 10 s")
    print(f"            inertia {result['select_inertia']:.1f} vs baseline {result['select_baseline_inertia']:.1f};"
          f" coverage (mean squared distance of a row to its nearest pick) {result['select_coverage_mean_sq_dist']:.4f}"
          f" vs baseline {result['select_baseline_coverage_mean_sq_dist']:.4f}, random picks "
          f"{result['select_random_coverage_mean_sq_dist']:.4f} (random vectors: nothing to find);"
          f" on the {args.texts} embedded prompts, k={result['select_real_k']}:"
          f" {result['select_real_coverage_mean_sq_dist']:.4f} vs random picks"
          f" {result['select_real_random_coverage_mean_sq_dist']:.4f}")
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
