"""The precision of matrix work on this machine, chosen by measurement and cached.

``auto`` (the default of ``models.precision`` and ``curation.embedding.precision``) resolves
to bf16 only where the hardware executes it natively (a CPU with AVX512-BF16 or AMX, a GPU that
supports bf16) **and** a short measured probe finds bf16 matrix products faster than fp32;
everywhere else to fp32 (on an AVX2 CPU, bf16 autocast is emulated and several times slower).

The probe (384 x 384 matrix products on one thread, the two precisions in alternating rounds, the
best product of each counted; under a second where bf16 is native, a few seconds where it is
emulated) runs once per machine. It must give the same answer on a busy machine as on an idle
one, since each state folder probes for itself and a replay elsewhere must choose as the build
did: measured with both cores and two other processes multiplying matrices, the former probe
(both threads, all fp32 products then all bf16 ones) chose fp32 on 2 of 10 tries on an AVX512-BF16
CPU (a two-thread product waits for whichever thread was descheduled: 9.5 GFLOP/s in bf16
against 870 idle), and so gave two engines different dataset hashes; one thread in alternating
rounds measured 4.2-4.3x on 10 of 10 busy tries. Its result is cached in
``<state_dir>/precision.json`` under a fingerprint of the machine (CPU model and flags, torch
version, GPU name, the probe's version), so every later start (and every replay
on this machine) reuses the same choice and produces the same bytes. A changed machine (a
state folder copied elsewhere, a new torch) probes again. Setting ``bf16`` or ``fp32``
overrides the probe; nothing is measured then.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import platform
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from flywheel_loop.engine.config import PRECISION_SPELLINGS

__all__ = [
    "CACHE_FILE",
    "Measure",
    "Precision",
    "ProbeResult",
    "cpu_native_bf16",
    "machine_fingerprint",
    "matmul_gflops",
    "physical_cores",
    "probe",
    "resolve_precision",
]

log = logging.getLogger(__name__)

Precision = Literal["bf16", "fp32"]
#: GFLOP/s of a matrix product at a precision ("bf16" or "fp32") on a device ("cpu", "cuda")
Measure = Callable[[str, str], float]

CACHE_FILE = "precision.json"
#: bf16 must beat fp32 by this factor to be chosen (a tie is not worth the rounding)
MARGIN = 1.1
#: alternating rounds of the probe (the best of each precision is kept)
ROUNDS = 5
#: part of the machine's fingerprint: a result cached by an earlier probe (two threads, one round each, which
#: a busy machine could mislead) is measured again
PROBE_VERSION = "probe-2"

_MEMO: dict[tuple[str, str], ProbeResult] = {}
_LOCK = threading.Lock()


@dataclass(frozen=True)
class ProbeResult:
    """What the probe found on one device, and what it chose."""

    device: str
    machine: str  # the fingerprint it was measured on
    native_bf16: bool
    fp32_gflops: float
    bf16_gflops: float
    chosen: Precision
    measured_at: float


@functools.cache
def _cpuinfo() -> tuple[dict[str, str], ...]:
    """Linux's /proc/cpuinfo, one record per logical CPU (empty elsewhere); read once per process."""
    records: list[dict[str, str]] = [{}]
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if not key.strip():
                records.append({})
            else:
                records[-1][key.strip()] = value.strip()
    return tuple(r for r in records if r)


def _cpu_info() -> tuple[str, set[str]]:
    """The CPU's model name and feature flags (from the first logical CPU; the platform's name elsewhere)."""
    first = _cpuinfo()[0] if _cpuinfo() else {}
    return first.get("model name") or platform.processor() or platform.machine(), set(first.get("flags", "").split())


def physical_cores() -> int | None:
    """Distinct (package, core) pairs of /proc/cpuinfo; None where it does not say."""
    return len({(r.get("physical id", ""), r["core id"]) for r in _cpuinfo() if "core id" in r}) or None


def cpu_native_bf16() -> bool:
    """Whether this CPU computes bf16 matrix products in hardware (AVX512-BF16 or AMX-BF16)."""
    _, flags = _cpu_info()
    if flags & {"avx512_bf16", "amx_bf16"}:
        return True
    import torch

    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())  # private: probe for it


def machine_fingerprint(device: str) -> str:
    """Names what the probe's result depends on: the CPU (or GPU), its flags, torch's version, the probe's."""
    import torch

    model, flags = _cpu_info()
    parts = [device, model, " ".join(sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))),
             torch.__version__, str(os.cpu_count()), PROBE_VERSION]
    if device == "cuda":
        parts.append(torch.cuda.get_device_name() if torch.cuda.is_available() else "no cuda")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def matmul_gflops(precision: str, device: str = "cpu", n: int = 512, seconds: float = 0.25,
                  threads: int | None = None) -> float:
    """Measured GFLOP/s of ``n`` x ``n`` matrix products at ``precision`` on ``device`` (the best
    of repeated products over about ``seconds``, after a warm-up)."""
    import torch

    from flywheel_loop.plugins.shared.models import torch_threads

    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be bf16 or fp32, not {precision!r}")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    reps = 50 if device == "cuda" else 1
    with torch_threads(threads if device == "cpu" else None), torch.inference_mode():
        a @ b
        sync()
        best = float("inf")
        deadline = time.perf_counter() + seconds
        runs = 0
        while runs < 2 or time.perf_counter() < deadline:
            started = time.perf_counter()
            for _ in range(reps):
                a @ b
            sync()
            best = min(best, (time.perf_counter() - started) / reps)
            runs += 1
    return 2 * n**3 / best / 1e9


def probe(device: str, measure: Measure | None = None, native: bool | None = None) -> ProbeResult:
    """Measure fp32 and bf16 matrix products on ``device`` and choose: bf16 where it is native
    and at least ``MARGIN`` times faster, else fp32. ``measure`` and ``native`` replace the
    real measurement and hardware check (tests)."""
    import torch

    if native is None:
        native = bool(torch.cuda.is_bf16_supported()) if device == "cuda" else cpu_native_bf16()
    measure = measure or (lambda p, d: matmul_gflops(p, d, n=384, seconds=0.04, threads=1))
    fp32 = bf16 = 0.0
    # alternating: a burst of load slows both precisions, not only one. Where bf16 is emulated the answer is
    # fp32 whatever is measured: one round (an emulated bf16 product takes about 0.2 s)
    for _ in range(ROUNDS if native else 1):
        fp32 = max(fp32, float(measure("fp32", device)))
        bf16 = max(bf16, float(measure("bf16", device)))
    if not (fp32 > 0 and bf16 > 0):
        raise ValueError(f"the precision probe measured {fp32} GFLOP/s in fp32 and {bf16} in bf16: not a rate")
    chosen: Precision = "bf16" if native and bf16 >= MARGIN * fp32 else "fp32"
    return ProbeResult(device=device, machine=machine_fingerprint(device), native_bf16=native,
                       fp32_gflops=round(fp32, 2), bf16_gflops=round(bf16, 2), chosen=chosen,
                       measured_at=round(time.time(), 3))


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("precision cache %s is unreadable (%s); probing again", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def cached_probe(device: str, cache_dir: Path | None, measure: Measure | None = None,
                 native: bool | None = None) -> ProbeResult:
    """The probe's result for ``device`` on this machine: from this process's memo, else from
    ``cache_dir/precision.json`` when it was measured on this machine, else measured now (and
    written there)."""
    machine = machine_fingerprint(device)
    where = str(cache_dir.resolve()) if cache_dir is not None else ""
    with _LOCK:
        memo = _MEMO.get((where, device))
        if memo is not None and memo.machine == machine and measure is None:
            return memo
        path = cache_dir / CACHE_FILE if cache_dir is not None else None
        cache = _read_cache(path) if path is not None else {}
        entry = cache.get(device)
        result: ProbeResult | None = None
        if isinstance(entry, dict) and entry.get("machine") == machine:
            with contextlib.suppress(TypeError, ValueError):
                result = ProbeResult(**entry)
                if result.chosen not in ("bf16", "fp32"):
                    result = None
        if result is None:
            result = probe(device, measure, native)
            log.info("precision probe on %s: fp32 %.1f GFLOP/s, bf16 %.1f GFLOP/s, native bf16 %s: %s",
                     device, result.fp32_gflops, result.bf16_gflops, result.native_bf16, result.chosen)
            if path is not None:
                _write_cache(path, {**cache, device: asdict(result)})
        _MEMO[(where, device)] = result
        return result


def resolve_precision(setting: str, device: str = "cpu", cache_dir: Path | None = None,
                      measure: Measure | None = None, native: bool | None = None) -> Precision:
    """``bf16`` or ``fp32`` for a precision setting: a fixed one as it is (``bfloat16`` and
    ``float32`` spell the same), ``auto`` by the cached probe of ``device``."""
    if setting in PRECISION_SPELLINGS:
        return PRECISION_SPELLINGS[setting]
    if setting != "auto":
        raise ValueError(f"precision must be auto, bf16 or fp32, not {setting!r}")
    return cached_probe(device, cache_dir, measure, native).chosen
