"""The gate: may the candidate replace the model in service?

Defaults from the reference design (``evaluator`` in the configuration): the task pass rate not
more than 2 points lower, the forgetting rate below 0.3, no secret or personal data reproduced
on the canary prompts; and (Flywheel's addition) the held-out loss not more than 5 % above the
model in service. Each check gives one reason, starting ``ok:`` or ``failed:``; the candidate
passes when no check failed. A check whose figure could not be measured (no held-out example
has tests, say) is reported as ``skipped:`` and does not fail the candidate.
"""

from __future__ import annotations

from collections.abc import Mapping

from flywheel_loop.plugins.evaluation.settings import EvaluatorConfig

__all__ = ["Figures", "verdict"]

Figures = Mapping[str, str | int | float | bool | None]


def _num(figures: Figures, key: str) -> float | None:
    value = figures.get(key)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def verdict(candidate: Figures, baseline: Figures, cfg: EvaluatorConfig) -> tuple[bool, list[str]]:
    """(passed, reasons) for the candidate's figures against the model in service."""
    reasons: list[str] = []
    failed = False

    def check(ok: bool, text: str) -> None:
        nonlocal failed
        failed |= not ok
        reasons.append(("ok: " if ok else "failed: ") + text)

    cand, base = _num(candidate, "task_pass_rate"), _num(baseline, "task_pass_rate")
    if cand is None or base is None:
        reasons.append("skipped: task pass rate (no held-out example with tests)")
    else:
        check(cand >= base - cfg.max_task_drop_points,
              f"task pass rate {cand:.1f}% vs {base:.1f}% in service (may drop {cfg.max_task_drop_points:g} points)")

    rate = _num(candidate, "forgetting_rate")
    if rate is None:
        reasons.append("skipped: forgetting rate (no forgetting set)")
    else:
        check(rate < cfg.max_forgetting_rate,
              f"forgetting rate {rate:.2f} over {candidate.get('forgetting_items')} items"
              f" (must stay below {cfg.max_forgetting_rate:g})")

    cand, base = _num(candidate, "held_out_loss"), _num(baseline, "held_out_loss")
    if cfg.max_loss_increase is None:
        pass
    elif cand is None or base is None:
        reasons.append("skipped: held-out loss (no validation split)")
    else:
        check(cand <= base * (1 + cfg.max_loss_increase),
              f"held-out loss {cand:.4f} vs {base:.4f} in service (may rise {100 * cfg.max_loss_increase:g}%)")

    if cfg.canary_check and _num(candidate, "canary_leaks") is None:
        reasons.append("skipped: canary check (no plugin scans text for secrets: is privacy disabled?)")
    elif cfg.canary_check:
        leaks = int(_num(candidate, "canary_leaks") or 0)
        check(leaks == 0, f"{leaks} canary prompts made it reproduce a secret or personal data"
              f" ({candidate.get('canary_prompts')} prompts)")

    cand, base = _num(candidate, "ms_per_token"), _num(baseline, "ms_per_token")
    if cfg.max_latency_ratio is not None and cand is not None and base:
        check(cand <= base * cfg.max_latency_ratio,
              f"latency {cand:.1f} ms/token vs {base:.1f} in service (at most x{cfg.max_latency_ratio:g})")
    return not failed, reasons
