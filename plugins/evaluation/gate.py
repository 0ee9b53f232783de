"""The gate: may the candidate replace the model in service? ``passed``, ``failed`` or ``inconclusive``.

Each check gives one ``Check`` (and one reason, starting ``ok:``, ``failed:``, ``inconclusive:``, or
``reported:`` for a figure shown and not gated):

- **task pass rate**, paired: the candidate and the model in service ran the same tasks' tests
  (``Paired``); the difference of their pass rates with Newcombe's interval at
  ``evaluator.confidence`` and the exact McNemar p-value. ``ok`` when the interval's low end is
  above ``-max_task_drop_points`` (the candidate is shown to lose at most that many points),
  ``failed`` when its high end is below 0 (it is shown to solve fewer tasks), else
  ``inconclusive``; ``inconclusive`` too with fewer than ``min_task_items`` tasks (``gate_tasks =
  false``: reported, not gated);
- **forgetting (suite)**, by running code: of the coding-suite problems the model in service
  solved, the share the candidate no longer solves, with its Wilson interval: ``failed`` when the
  low end is above ``max_suite_forgetting`` (it lost significantly more than allowed), ``ok`` when
  the high end is below it, else ``inconclusive``; ``inconclusive`` when the model in service
  solved fewer than ``min_suite_solved`` problems of the sample, or the suite could not run (``suite =
  none`` or ``suite_sample = 0``: no suite check);
- **forgetting (loss)**, secondary: the share of forgetting-set items whose answer loss rose, below
  ``max_forgetting_rate``; with ``loss_forgetting = "fallback"`` (the default) it gates only where the suite
  check could not measure forgetting, and is ``reported`` (shown, not gated) where it could;
- **held-out loss** at most ``max_loss_increase`` above the model in service;
- **canary**: no secret or personal data the model in service did not produce, of a kind the candidate's
  training data holds (one it made up is said, not failed: ``evaluator.py``);
- **latency** (when ``max_latency_ratio`` is set).

A figure that could not be measured is ``inconclusive``, never ``ok``. The verdict: ``failed``
when a check failed, else ``inconclusive`` when one is, else ``passed`` (a ``reported`` figure does not
count). What an inconclusive
verdict leads to is the deployer's policy (``deployer.on_inconclusive``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from flywheel_loop.plugins.evaluation.settings import EvaluatorConfig
from flywheel_loop.plugins.evaluation.stats import Paired, mcnemar_p, wilson

__all__ = ["Check", "Figures", "GateResult", "Status", "Verdict", "verdict"]

Figures = Mapping[str, str | int | float | bool | None]
#: reported: measured and shown beside the checks, not gated
Status = Literal["ok", "failed", "inconclusive", "reported"]
Verdict = Literal["passed", "failed", "inconclusive"]


@dataclass(frozen=True)
class Check:
    """One check's outcome: its figure, the interval around it and how many items it rests on."""

    name: str
    status: Status
    detail: str
    value: float | None = None
    low: float | None = None
    high: float | None = None
    items: int | None = None
    p_value: float | None = None

    @property
    def reason(self) -> str:
        return f"{self.status}: {self.detail}"


@dataclass(frozen=True)
class GateResult:
    verdict: Verdict
    checks: tuple[Check, ...]

    @property
    def passed(self) -> bool:
        return self.verdict == "passed"

    @property
    def reasons(self) -> list[str]:
        return [c.reason for c in self.checks]


def _num(figures: Figures, key: str) -> float | None:
    value = figures.get(key)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _pct(x: float) -> str:
    return f"{100 * x:+.1f}"


def task_check(tasks: Paired | None, cfg: EvaluatorConfig) -> Check:
    """The paired task pass-rate check (see the module docstring)."""
    name = "task pass rate"
    if tasks is None or tasks.items == 0:
        return Check(name, "inconclusive", "task pass rate not measured (no held-out or recorded task with tests)",
                     items=0)
    diff, low, high = tasks.difference(cfg.confidence)
    _, cand_only, base_only, _ = tasks.table
    p = mcnemar_p(cand_only, base_only)
    cand = 100 * sum(tasks.candidate) / tasks.items
    base = 100 * sum(tasks.baseline) / tasks.items
    margin = cfg.max_task_drop_points / 100
    text = (f"task pass rate {cand:.1f}% vs {base:.1f}% in service on the same {tasks.items} tasks: difference"
            f" {_pct(diff)} points, {100 * cfg.confidence:g}% interval [{_pct(low)}, {_pct(high)}],"
            f" McNemar p={p:.3g} ({cand_only} solved only by the candidate, {base_only} only in service)")
    status: Status
    if tasks.items < cfg.min_task_items:
        status, text = "inconclusive", f"{text}; fewer than min_task_items={cfg.min_task_items} tasks"
    elif low >= -margin:
        status, text = "ok", f"{text}; may drop {cfg.max_task_drop_points:g} points"
    elif high < 0:
        status, text = "failed", f"{text}: significantly fewer tasks solved"
    else:
        status, text = "inconclusive", (f"{text}; the interval allows a drop of more than"
                                        f" {cfg.max_task_drop_points:g} points and a draw")
    return Check(name, status, text, diff, low, high, tasks.items, p)


def suite_check(suite: Paired | None, cfg: EvaluatorConfig, why_missing: str = "") -> Check:
    """Forgetting measured by running the coding suite (see the module docstring)."""
    name = "forgetting (suite)"
    if suite is None:
        return Check(name, "inconclusive", f"suite forgetting not measured: {why_missing or 'the suite did not run'}",
                     items=0)
    solved = sum(suite.baseline)
    lost = sum(b and not c for c, b in zip(suite.candidate, suite.baseline, strict=True))
    _, cand_only, base_only, _ = suite.table
    p = mcnemar_p(cand_only, base_only)
    cand_rate, base_rate = sum(suite.candidate) / suite.items, solved / suite.items
    head = (f"suite {cfg.suite}: pass@1 {100 * cand_rate:.1f}% vs {100 * base_rate:.1f}% in service on"
            f" {suite.items} problems (McNemar p={p:.3g})")
    if solved < cfg.min_suite_solved:
        return Check(name, "inconclusive", f"{head}; the model in service solved {solved}, fewer than"
                     f" min_suite_solved={cfg.min_suite_solved}: forgetting not measurable", None, None, None,
                     solved, p)
    share = lost / solved
    low, high = wilson(lost, solved, cfg.confidence)
    text = (f"{head}; forgot {lost} of the {solved} it solved: {share:.2f}, {100 * cfg.confidence:g}% interval"
            f" [{low:.2f}, {high:.2f}] (limit {cfg.max_suite_forgetting:g})")
    status: Status = "failed" if low > cfg.max_suite_forgetting else "ok" if high < cfg.max_suite_forgetting \
        else "inconclusive"
    if status == "failed":
        text += ": lost significantly more than allowed"
    return Check(name, status, text, share, low, high, solved, p)


def verdict(candidate: Figures, baseline: Figures, cfg: EvaluatorConfig, tasks: Paired | None = None,
            suite: Paired | None = None, suite_missing: str = "") -> GateResult:
    """The verdict on the candidate's figures against the model in service's; ``tasks`` and
    ``suite`` are the paired outcomes of the tasks with tests and of the coding-suite sample."""
    checks: list[Check] = [task_check(tasks, cfg)] if cfg.gate_tasks else []
    suite_measured = False
    if cfg.suite is not None and cfg.suite_sample > 0:
        checks.append(suite_check(suite, cfg, suite_missing))
        suite_measured = checks[-1].value is not None

    def simple(name: str, ok: bool | None, text: str, value: float | None = None, items: int | None = None) -> None:
        status: Status = "inconclusive" if ok is None else "ok" if ok else "failed"
        checks.append(Check(name, status, text, value, items=items))

    rate = _num(candidate, "forgetting_rate")
    items = int(_num(candidate, "forgetting_items") or 0)
    if rate is None:
        simple("forgetting (loss)", None, "forgetting rate (answer loss) not measured (no forgetting set)", items=0)
    elif suite_measured and cfg.loss_forgetting == "fallback":
        checks.append(Check("forgetting (loss)", "reported", f"forgetting rate (answer loss) {rate:.2f} over {items}"
                            f" items (limit {cfg.max_forgetting_rate:g}); not gated: the coding suite measured"
                            " forgetting by running code (evaluator.loss_forgetting = fallback)", rate, items=items))
    else:
        simple("forgetting (loss)", rate < cfg.max_forgetting_rate,
               f"forgetting rate (answer loss) {rate:.2f} over {items} items"
               f" (must stay below {cfg.max_forgetting_rate:g})", rate, items)

    cand, base = _num(candidate, "held_out_loss"), _num(baseline, "held_out_loss")
    if cfg.max_loss_increase is not None:
        if cand is None or base is None:
            simple("held-out loss", None, "held-out loss not measured (no validation split)")
        else:
            simple("held-out loss", cand <= base * (1 + cfg.max_loss_increase),
                   f"held-out loss {cand:.4f} vs {base:.4f} in service (may rise {100 * cfg.max_loss_increase:g}%)",
                   cand, int(_num(candidate, "held_out_items") or 0))

    if cfg.canary_check:
        leaks = _num(candidate, "canary_leaks")
        prompts = int(_num(candidate, "canary_prompts") or 0)
        if leaks is None:
            simple("canary", None, "canary check not measured (no plugin scans text for secrets: is privacy"
                   " disabled? evaluator.canary_check = false turns the check off)")
        else:
            invented = int(_num(candidate, "canary_invented") or 0)
            made_up = (f"; on {invented} it made up a kind its training data does not hold (not reproduced)"
                       if invented else "")
            simple("canary", leaks == 0, f"{int(leaks)} canary prompts made it reproduce a secret or personal"
                   f" data its training data holds ({prompts} prompts){made_up}", leaks, prompts)

    cand, base = _num(candidate, "ms_per_token"), _num(baseline, "ms_per_token")
    if cfg.max_latency_ratio is not None:
        if cand is None or not base:
            simple("latency", None, "latency not measured (no token generated)")
        else:
            simple("latency", cand <= base * cfg.max_latency_ratio,
                   f"latency {cand:.1f} ms/token vs {base:.1f} in service (at most x{cfg.max_latency_ratio:g})", cand)
    statuses = {c.status for c in checks if c.status != "reported"}
    outcome: Verdict = "failed" if "failed" in statuses else "inconclusive" if "inconclusive" in statuses \
        else "passed"
    return GateResult(outcome, tuple(checks))
