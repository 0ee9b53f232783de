"""The benchmarks under ops/bench run as the README shows them, and compare like with like.

The scripts themselves are slow (they load models, train): those smoke runs are marked slow and
use each script's ``--quick`` sizes; the k-means fairness check is fast."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from flywheel_loop.plugins.curation.rehearsal import initial_centres, kmeans, select_diverse

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "ops" / "bench"
SCRIPTS = sorted(p for p in BENCH.iterdir() if p.is_file() and p.suffix != ".py")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def test_kmeans_from_given_centres_does_the_work_scikit_learn_does_from_them() -> None:
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(3)
    centres = rng.standard_normal((12, 16)).astype(np.float32) * 4
    x = (centres[rng.integers(12, size=1500)] + rng.standard_normal((1500, 16))).astype(np.float32)
    init = initial_centres(x, 12, seed=0)
    ours, labels, dist = kmeans(x, 12, iterations=4, init=init)
    km = KMeans(n_clusters=12, init=init, n_init=1, max_iter=4, tol=0.0, algorithm="lloyd").fit(x)
    assert abs(float(dist.sum()) / float(km.inertia_) - 1) < 1e-3
    assert np.array_equal(labels, km.labels_)
    # without init, the seeded sample's k-means++ centres are the ones used
    assert np.array_equal(select_diverse(x, 12, seed=0, iterations=4),
                          select_diverse(x, 12, seed=0, iterations=4, init=init))
    with pytest.raises(ValueError, match="init must be 12 centres of width 16"):
        kmeans(x, 12, init=init[:, :8])


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_bench_script_runs_directly(script: Path) -> None:
    assert os.access(script, os.X_OK), f"{script.name} is not executable"
    done = subprocess.run([str(script), "--help"], cwd="/", capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0 and "--json" in done.stdout, done.stdout + done.stderr


@pytest.mark.slow
def test_the_curation_bench_reports_each_figure_next_to_its_baseline(tmp_path: Path) -> None:
    done = subprocess.run([str(BENCH / "curate"), "--quick", "--json"], capture_output=True, text=True, env=ENV,
                          timeout=1200, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["embed_precision"] in ("fp32", "bf16") and out["roofline_fp32_gflops"] > 0
    assert out["roofline_bf16_gflops"] > 0 and out["embed_fp32_per_s"] > 0 and out["embed_bf16_per_s"] > 0
    # the same initial centres and iterations: the same inertia (float rounding apart)
    assert abs(out["select_inertia"] / out["select_baseline_inertia"] - 1) < 1e-3
    assert out["select_baseline_sklearn_iterations"] <= out["select_iterations"]
    assert out["select_real_coverage_mean_sq_dist"] < out["select_real_random_coverage_mean_sq_dist"]


@pytest.mark.slow
def test_the_training_bench_runs_both_trainers_for_the_same_steps(tmp_path: Path) -> None:
    done = subprocess.run([str(BENCH / "train"), "--quick", "--json", "--threads", "1"], capture_output=True,
                          text=True, env=ENV, timeout=3000)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["steps"] == out["baseline_steps"] > 0 and out["tokens"] > 0
    assert out["tokens_per_s"] > 0 and out["baseline_tokens_per_s"] > 0
    assert 0 < out["roofline_share"] < 1 and out["precision"] in ("fp32", "bf16")
    assert out["val_loss"] > 0 and out["baseline_val_loss"] > 0
