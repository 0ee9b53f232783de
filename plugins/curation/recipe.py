"""The dataset recipe: from the log up to a position to the rows of an SFT and a DPO dataset.

Pure functions (the builder does the I/O): ``fold_log`` turns the events up to a position into
the role's eligible examples; ``build_dataset`` turns those into rows. Everything is ordered by
event id or log sequence and every random choice is seeded, so the same log up to the same
position gives the same rows, byte for byte.

The recipe, for one role:

1. **Eligible**: an anonymized interaction whose latest score (as of the position) clears the
   quality bar (``curation.min_reward`` moved by complexity), or that carries a human
   correction (``corrections_bypass_quality``). A correction becomes the target (bare code fenced like
   the answer it corrects: ``fence_code_corrections``).
2. **New or past**: an example is new when it became eligible after the role's last
   ``dataset.built`` on the log; earlier ones are past, material for rehearsal only.
3. **Forgetting set**: ``forgetting_share`` of all interactions (by a seeded hash of the
   interaction id, so the same ones in every dataset) are never trained on; those eligible up
   to the position form the held-out forgetting set (at most ``forgetting_max``).
4. **Duplicates**: exact (same prompt and target up to whitespace), then near (prompt
   embeddings at or above ``near_duplicate_threshold``), over new and past together, keeping
   new before past, then the higher reward, then the earlier event.
5. **Balance**: at most ``max_per_cell`` new examples per (role, domain, complexity) cell, the
   best kept; the table of available and kept per cell is reported.
6. **Split**: ``validation_share`` of each cell (rounded half up) to validation, by seeded hash.
7. **Rehearsal**: ``rehearsal_count`` past examples chosen by k-means diversity join the
   training split (tagged ``rehearsal``); when the past cannot fill it the
   ``synthesize_rehearsal`` hook may add synthetic rows.
8. **DPO**: each corrected new example gives a pair (chosen: the correction; rejected: the
   original answer), following the SFT split.
9. **Verified attempts** (``attempts.sampled``, the sampler's answers run against a task's tests):
   for each task sampled up to the position (in any round: a verified answer does not go stale, so
   a later round's dataset holds the earlier rounds' answers too), not held out and not forgotten, at most
   ``rft_per_task`` distinct passing answers (shortest first, then by hash) become rows tagged
   ``source: rft``, and at most ``rft_pairs_per_task`` DPO pairs put a passing answer (chosen)
   against a failing one (rejected). A task with no passing answer gives nothing. They follow the
   split of their task (seeded by its interaction id). ``sizes`` and ``sources`` count the rows of
   each source (human, rft, rehearsal; dpo_human, dpo_rft).

**Forgotten data** (``data.forgotten``, see ``plugins/forgetting.py``) is left out whatever its
position: ``fold_log`` takes the forgotten ids of the whole log, so a dataset rebuilt at an old
position after a subject was forgotten no longer holds the subject's interactions (the rebuilt
dataset supersedes the old one), and replaying it later gives that same rebuilt dataset.

Every SFT row and DPO pair carries ``tests``: the test code of the interaction's context
(``context.tests``, anonymized), or null, so an evaluator can run generated code against it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from flywheel_loop.plugins.curation.dedupe import exact_duplicates, exact_key, near_duplicates
from flywheel_loop.plugins.curation.rehearsal import rehearsal_count, select_diverse
from flywheel_loop.plugins.curation.settings import CurationConfig
from flywheel_loop.plugins.shared.chat_format import ChatFormatter
from flywheel_loop.plugins.shared.code import in_answer_form
from flywheel_loop.plugins.shared.holdout import held_out
from flywheel_loop.plugins.shared.holdout import unit as _unit
from flywheel_loop.schemas import (
    AttemptsSampled,
    BalanceRow,
    DataForgotten,
    DatasetBuilt,
    Event,
    FeedbackAnonymized,
    InteractionAnonymized,
    QualityAssessed,
)

__all__ = [
    "READ_TYPES",
    "BuiltDataset",
    "Attempts",
    "Evidence",
    "Example",
    "Skip",
    "SkipReason",
    "build_dataset",
    "fold_log",
    "verified_rows",
    "forgotten_ids",
]

#: The event types a build reads from the log.
READ_TYPES = ("interaction.anonymized", "feedback.anonymized", "quality.assessed", "dataset.built", "attempts.sampled")
UNKNOWN = "unknown"

SkipReason = Literal["no_data", "no_examples", "too_few_examples", "base_model_missing", "invalid_request"]
VectorSource = Callable[[list["Example"]], np.ndarray]
Synthesizer = Callable[[str, list[dict[str, Any]], int], list[dict[str, Any]]]


@dataclass(frozen=True)
class Example:
    """One eligible interaction as of the position."""

    interaction_id: str
    event_id: str  # the interaction.anonymized event
    score_id: str  # the quality.assessed event that scored it last
    feedback_id: str | None  # the feedback.anonymized whose correction is the target
    seq: int  # the log sequence at which it became eligible
    role: str
    domain: str
    complexity: str
    prompt: str
    output: str
    correction: str | None
    reward: float
    tests: str | None = None  # the anonymized context.tests: test code the answer must pass

    @property
    def target(self) -> str:
        return self.correction if self.correction is not None else self.output

    @property
    def cell(self) -> tuple[str, str]:
        return (self.domain, self.complexity)


@dataclass(frozen=True)
class Attempts:
    """The sampled answers to one recorded task, every round's (``attempts.sampled``)."""

    interaction_id: str
    event_ids: tuple[str, ...]  # the attempts.sampled events, in log order
    task_event_id: str  # the interaction.anonymized event
    prompt: str
    tests: str | None
    domain: str
    complexity: str
    answers: tuple[tuple[str, bool], ...]  # (answer, passed its tests), in log order


@dataclass
class Evidence:
    """What the log up to ``position`` holds for one role."""

    role: str
    position: int
    previous_position: int = 0  # log_position of the role's last dataset.built (0: none)
    interactions: int = 0
    scored: int = 0
    examples: list[Example] = field(default_factory=list)
    attempts: list[Attempts] = field(default_factory=list)


@dataclass(frozen=True)
class Skip:
    """Why no dataset was built (becomes a ``dataset.skipped``)."""

    reason: SkipReason
    detail: str


@dataclass
class BuiltDataset:
    """The rows of every split and what describes them (the store writes the files)."""

    role: str
    position: int
    previous_position: int
    splits: dict[str, list[dict[str, Any]]]
    sizes: dict[str, int]
    balance: list[BalanceRow]
    rehearsal_share: float
    lineage: list[str]
    identity: dict[str, Any]  # everything else that decided the content (manifest)
    sources: dict[str, int] = field(default_factory=dict)  # training rows per source (human, rft, rehearsal, dpo_*)


# --------------------------------------------------------------------------- fold


def forgotten_ids(events: Iterable[tuple[int, Event[Any]]]) -> frozenset[str]:
    """Every interaction id and event id that a ``data.forgotten`` among ``events`` lists."""
    out: set[str] = set()
    for _, event in events:
        if isinstance(event.data, DataForgotten):
            out.update(event.data.interaction_ids)
            out.update(event.data.event_ids)
    return frozenset(out)


def fold_log(
    events: Iterable[tuple[int, Event[Any]]],
    role: str,
    curation: CurationConfig,
    position: int,
    forgotten: frozenset[str] = frozenset(),
) -> Evidence:
    """The eligible examples of ``role`` from ``(sequence, event)`` pairs in log order,
    leaving out every interaction (and event) in ``forgotten`` (``forgotten_ids`` of the log), and
    every event whose personal text was shredded (``event.forgotten``: its key is destroyed)."""
    interactions: dict[str, tuple[str, InteractionAnonymized]] = {}
    scores: dict[str, tuple[str, QualityAssessed]] = {}
    first_high: dict[str, int] = {}
    corrections: dict[str, tuple[str, int, str]] = {}
    sampled: list[tuple[int, str, AttemptsSampled]] = []
    previous = 0
    bypass = curation.dataset.corrections_bypass_quality
    fence = curation.dataset.fence_code_corrections
    for seq, event in events:
        if seq > position:
            break
        data = event.data
        if event.id in forgotten or event.forgotten:
            continue
        if isinstance(data, InteractionAnonymized):
            if data.interaction.role == role and data.interaction_id not in forgotten:
                interactions[data.interaction_id] = (event.id, data)
        elif isinstance(data, QualityAssessed):
            if data.role == role:
                scores[data.interaction_id] = (event.id, data)
                if data.interaction_id not in first_high and curation.is_high_quality(data.reward, data.complexity):
                    first_high[data.interaction_id] = seq
        elif isinstance(data, FeedbackAnonymized):
            correction = data.feedback.correction
            if correction and correction.strip():
                corrections[data.feedback.interaction_id] = (event.id, seq, correction)
        elif isinstance(data, AttemptsSampled):
            if data.role == role and data.interaction_id not in forgotten:
                sampled.append((seq, event.id, data))
        elif isinstance(data, DatasetBuilt) and data.role == role and data.log_position < position:
            previous = max(previous, data.log_position)
    evidence = Evidence(role=role, position=position, previous_position=previous, interactions=len(interactions))
    evidence.attempts = _attempts(sampled, interactions)
    for iid in sorted(interactions, key=lambda i: interactions[i][0]):
        event_id, anonymized = interactions[iid]
        if iid not in scores:
            continue
        evidence.scored += 1
        score_id, score = scores[iid]
        rec = anonymized.interaction
        complexity = rec.complexity or score.complexity
        high = curation.is_high_quality(score.reward, complexity)
        fb = corrections.get(iid) if bypass or high else None
        if not high and fb is None:
            continue
        since = [s for s in (first_high.get(iid) if high else None, fb[1] if fb else None) if s is not None]
        evidence.examples.append(
            Example(
                interaction_id=iid,
                event_id=event_id,
                score_id=score_id,
                feedback_id=fb[0] if fb else None,
                seq=min(since) if since else 0,
                role=role,
                domain=rec.domain or score.domain or UNKNOWN,
                complexity=complexity or UNKNOWN,
                prompt=rec.input,
                output=rec.output,
                correction=(in_answer_form(fb[2], rec.output) if fence else fb[2]) if fb else None,
                reward=score.reward,
                tests=rec.context.tests,
            )
        )
    return evidence


def _attempts(
    sampled: list[tuple[int, str, AttemptsSampled]],
    interactions: dict[str, tuple[str, InteractionAnonymized]],
) -> list[Attempts]:
    """The answers sampled per task (every round), for tasks whose interaction is on the log."""
    per_task: dict[str, list[tuple[str, AttemptsSampled]]] = {}
    for _, event_id, data in sampled:
        if data.interaction_id in interactions:
            per_task.setdefault(data.interaction_id, []).append((event_id, data))
    out: list[Attempts] = []
    for iid in sorted(per_task, key=lambda i: interactions[i][0]):
        rec = interactions[iid][1].interaction
        answers = tuple(
            (answer, bool(ok))
            for _, data in per_task[iid]
            for answer, ok in zip(data.answers, data.verdicts, strict=False)
        )
        out.append(Attempts(
            interaction_id=iid,
            event_ids=tuple(e for e, _ in per_task[iid]),
            task_event_id=interactions[iid][0],
            prompt=rec.input,
            tests=rec.context.tests,
            domain=rec.domain or UNKNOWN,
            complexity=rec.complexity or UNKNOWN,
            answers=answers,
        ))
    return out


def _short_first(answers: Iterable[str]) -> list[str]:
    """Distinct answers (up to whitespace), shortest first, then by hash (a stable order)."""
    seen: dict[str, str] = {}
    for answer in answers:
        if answer.strip():
            seen.setdefault(exact_key("", answer), answer)
    return sorted(seen.values(), key=lambda a: (len(a), hashlib.sha256(a.encode()).hexdigest()))


def verified_rows(attempts: Attempts, per_task: int, pairs_per_task: int) -> tuple[list[str], list[tuple[str, str]]]:
    """(the passing answers kept as rows, the (passing, failing) pairs) of one task: none without a
    passing answer; a pair always puts a passing answer first."""
    passing = _short_first(a for a, ok in attempts.answers if ok)
    if not passing:
        return [], []
    keys = {exact_key("", a) for a in passing}
    failing = [a for a in _short_first(a for a, ok in attempts.answers if not ok) if exact_key("", a) not in keys]
    n_pairs = min(pairs_per_task, len(passing), len(failing))
    return passing[:per_task], [(passing[i], failing[i]) for i in range(n_pairs)]


# --------------------------------------------------------------------------- build


def _priority(e: Example, is_new: bool) -> tuple[int, int, float, str]:
    return (0 if is_new else 1, 0 if e.correction is not None else 1, -e.reward, e.event_id)


def _half_up(x: float) -> int:
    return int(np.floor(x + 0.5))


def build_dataset(
    evidence: Evidence,
    curation: CurationConfig,
    formatter: ChatFormatter,
    vectors: VectorSource,
    synthesize: Synthesizer | None = None,
    identity: dict[str, Any] | None = None,
) -> BuiltDataset | Skip:
    """The dataset of ``evidence`` (see the module docstring), or why there is none."""
    cfg = curation.dataset
    role, position, previous = evidence.role, evidence.position, evidence.previous_position
    if evidence.interactions == 0:
        return Skip("no_data", f"no anonymized {role} interactions on the log up to position {position}")
    bars = sorted({curation.reward_bar(c) for c in (None, *curation.complexity_offsets)})
    rft_tasks = [
        a for a in evidence.attempts
        if not held_out(cfg.seed, cfg.forgetting_share, a.interaction_id)
        and verified_rows(a, cfg.rft_per_task, cfg.rft_pairs_per_task) != ([], [])
    ]
    if not evidence.examples and not rft_tasks:
        return Skip(
            "no_examples",
            f"{evidence.interactions} {role} interactions up to log position {position} ({evidence.scored} scored);"
            f" none cleared the quality bar (reward >= {curation.min_reward:g}, {bars[0]:g} to {bars[-1]:g}"
            " by complexity) or carried a correction",
        )
    held = {e.interaction_id for e in evidence.examples if held_out(cfg.seed, cfg.forgetting_share, e.interaction_id)}
    forgetting = sorted(
        (e for e in evidence.examples if e.interaction_id in held),
        key=lambda e: (_unit(cfg.seed, "forget-order", e.interaction_id), e.event_id),
    )[: cfg.forgetting_max]
    pool = [e for e in evidence.examples if e.interaction_id not in held]
    new_mask = np.array([e.seq > previous for e in pool], dtype=bool)
    n_new = int(new_mask.sum())
    sizes: dict[str, int] = {"eligible": len(evidence.examples), "held_out": len(held)}

    # Duplicates over new and past together, the better example of each group kept.
    order = sorted(range(len(pool)), key=lambda i: _priority(pool[i], bool(new_mask[i])))
    keys = [exact_key(e.prompt, e.target) for e in pool]
    exact = exact_duplicates(keys, order)
    survivors = [i for i in order if not exact[i]]
    near = np.zeros(len(pool), dtype=bool)
    row_of: dict[int, int] = {}  # pool index -> row of `matrix`
    matrix = np.zeros((0, 0), dtype=np.float32)
    if survivors and (n_new or rft_tasks):
        matrix = vectors([pool[i] for i in survivors])
        row_of = {i: n for n, i in enumerate(survivors)}
        dropped = near_duplicates(matrix, list(range(len(survivors))), cfg.near_duplicate_threshold, seed=cfg.seed)
        near[np.asarray(survivors)[dropped]] = True
    sizes["duplicates"] = int((exact & new_mask).sum())
    sizes["near_duplicates"] = int((near & new_mask).sum())
    alive = ~(exact | near)
    new = [pool[i] for i in order if alive[i] and new_mask[i]]
    past_index = [i for i in order if alive[i] and not new_mask[i]]
    past = [pool[i] for i in past_index]

    if len(new) < cfg.min_examples and not rft_tasks:
        since = f"since the last {role} dataset (log position {previous})" if previous else "on the log"
        return Skip(
            "too_few_examples",
            f"{len(new)} new {role} examples {since} up to position {position} after removing duplicates"
            f" ({n_new} before); curation.dataset.min_examples is {cfg.min_examples}",
        )

    # Balance: at most max_per_cell per (role, domain, complexity); `new` is in priority order.
    cells: dict[tuple[str, str], list[Example]] = {}
    for e in new:
        cells.setdefault(e.cell, []).append(e)
    balance = [
        BalanceRow(role=role, domain=d, complexity=c, available=len(m), kept=min(len(m), cfg.max_per_cell))
        for (d, c), m in sorted(cells.items())
    ]
    sizes["capped"] = sum(r.available - r.kept for r in balance)

    # Split, stratified per cell.
    train: list[Example] = []
    validation: list[Example] = []
    for cell in sorted(cells):
        kept = sorted(
            cells[cell][: cfg.max_per_cell], key=lambda e: (_unit(cfg.seed, "split", e.interaction_id), e.event_id)
        )
        n_val = min(_half_up(len(kept) * cfg.validation_share), len(kept) - 1 if len(kept) > 1 else 0)
        validation.extend(kept[:n_val])
        train.extend(kept[n_val:])

    # Verified attempts: passing answers as rows, passing-vs-failing pairs, split by task.
    rft_train: list[dict[str, Any]] = []
    rft_validation: list[dict[str, Any]] = []
    rft_pairs: dict[str, list[dict[str, Any]]] = {"train": [], "validation": []}
    for a in rft_tasks:
        kept_answers, pairs = verified_rows(a, cfg.rft_per_task, cfg.rft_pairs_per_task)
        side = "validation" if _unit(cfg.seed, "split", a.interaction_id) < cfg.validation_share else "train"
        rows_out = rft_validation if side == "validation" else rft_train
        for answer in kept_answers:
            rows_out.append({
                "id": f"rft-{a.interaction_id}-{hashlib.sha256(answer.encode()).hexdigest()[:16]}",
                "event_id": a.event_ids[-1],
                **formatter.conversation(a.prompt, answer),
                "role": role,
                "domain": a.domain,
                "complexity": a.complexity,
                "reward": None,
                "source": "rft",
                "rehearsal": False,
                "tests": a.tests,
            })
        for good, bad in pairs:
            rft_pairs[side].append({
                "id": f"rft-{a.interaction_id}-{hashlib.sha256((good + chr(0) + bad).encode()).hexdigest()[:16]}",
                "event_id": a.event_ids[-1],
                "feedback_id": None,
                "prompt": formatter.prompt(a.prompt),
                "chosen": good,
                "rejected": bad,
                "role": role,
                "domain": a.domain,
                "complexity": a.complexity,
                "tests": a.tests,
                "source": "rft",
            })

    # Rehearsal: the most diverse past examples, then synthetic ones if a plugin offers them.
    wanted = rehearsal_count(cfg.rehearsal_share, len(train) + len(rft_train))
    chosen: list[Example] = []
    if wanted and past:
        if len(past) > wanted:
            picks = select_diverse(matrix[[row_of[i] for i in past_index]], wanted, seed=cfg.seed).tolist()
        else:
            picks = list(range(len(past)))
        chosen = [past[i] for i in picks]

    def row(e: Example, rehearsal: bool) -> dict[str, Any]:
        conv = formatter.conversation(e.prompt, e.target)
        return {
            "id": e.interaction_id,
            "event_id": e.event_id,
            **conv,
            "role": e.role,
            "domain": e.domain,
            "complexity": e.complexity,
            "reward": e.reward,
            "source": "correction" if e.correction is not None else "output",
            "rehearsal": rehearsal,
            "tests": e.tests,
        }

    train_rows = [row(e, False) for e in sorted(train, key=lambda e: e.event_id)]
    rehearsal_rows = [row(e, True) for e in sorted(chosen, key=lambda e: e.event_id)]
    synthetic_rows: list[dict[str, Any]] = []
    if synthesize is not None and wanted > len(chosen):
        offered = synthesize(role, [dict(r) for r in train_rows], wanted - len(chosen)) or []
        for item in offered[: wanted - len(chosen)]:
            prompt, completion = item.get("prompt"), item.get("completion")
            if not (isinstance(prompt, str) and isinstance(completion, str) and prompt and completion):
                raise ValueError("synthesize_rehearsal rows need non-empty 'prompt' and 'completion' strings")
            ident = hashlib.sha256(f"{prompt}\x00{completion}".encode()).hexdigest()[:24]
            synthetic_rows.append(
                {
                    "id": f"synthetic-{ident}",
                    "event_id": None,
                    **formatter.conversation(prompt, completion),
                    "role": role,
                    "domain": str(item.get("domain") or UNKNOWN),
                    "complexity": str(item.get("complexity") or UNKNOWN),
                    "reward": None,
                    "source": "synthetic",
                    "rehearsal": True,
                    "tests": None,
                }
            )
    all_train = sorted(train_rows + rft_train + rehearsal_rows + synthetic_rows,
                       key=lambda r: (r["event_id"] or "~", r["id"]))
    n_rehearsal = len(rehearsal_rows) + len(synthetic_rows)
    share = n_rehearsal / len(all_train) if all_train else 0.0

    def pair(e: Example) -> dict[str, Any]:
        return {
            "id": e.interaction_id,
            "event_id": e.event_id,
            "feedback_id": e.feedback_id,
            "prompt": formatter.prompt(e.prompt),
            "chosen": e.correction,
            "rejected": e.output,
            "role": e.role,
            "domain": e.domain,
            "complexity": e.complexity,
            "tests": e.tests,
            "source": "correction",
        }

    def corrected(rows: list[Example]) -> list[Example]:
        pairs = (e for e in rows if e.correction is not None and e.correction != e.output)
        return sorted(pairs, key=lambda e: e.event_id)

    splits = {
        "train": all_train,
        "validation": sorted([row(e, False) for e in validation] + rft_validation,
                             key=lambda r: (r["event_id"], r["id"])),
        "forgetting": [row(e, False) for e in sorted(forgetting, key=lambda e: e.event_id)],
        "dpo_train": sorted([pair(e) for e in corrected(train)] + rft_pairs["train"],
                            key=lambda r: (r["event_id"], r["id"])),
        "dpo_validation": sorted([pair(e) for e in corrected(validation)] + rft_pairs["validation"],
                                 key=lambda r: (r["event_id"], r["id"])),
    }
    used = [*train, *validation, *chosen, *forgetting]
    lineage = sorted({i for e in used for i in (e.event_id, e.score_id, e.feedback_id) if i}
                     | {i for a in rft_tasks for i in (*a.event_ids, a.task_event_id)})
    sources = {
        "human": len(train_rows),
        "rft": len(rft_train),
        "rehearsal": n_rehearsal,
        "dpo_human": len(corrected(train)),
        "dpo_rft": len(rft_pairs["train"]),
    }
    sizes.update(
        {
            "new": n_new,
            "past": len(past),
            "rehearsal": n_rehearsal,
            "synthetic": len(synthetic_rows),
            "forgetting": len(splits["forgetting"]),
            "train": len(all_train),
            "validation": len(splits["validation"]),
            "dpo_train": len(splits["dpo_train"]),
            "dpo_validation": len(splits["dpo_validation"]),
            "rft_tasks": len(rft_tasks),
            "rft": len(rft_train) + len(rft_validation),
            "dpo_rft": len(rft_pairs["train"]) + len(rft_pairs["validation"]),
        }
    )
    return BuiltDataset(
        role=role,
        position=position,
        previous_position=previous,
        splits=splits,
        sizes=dict(sorted(sizes.items())),
        balance=balance,
        rehearsal_share=share,
        lineage=lineage,
        sources=sources,
        identity={
            "chat_template": {"base_model": formatter.name, "sha256": formatter.template_sha256},
            "quality": {
                "min_reward": curation.min_reward,
                "complexity_offsets": dict(sorted(curation.complexity_offsets.items())),
            },
            "recipe": cfg.model_dump(mode="json", exclude={"base_model", "lineage_in_event"}),
            "rehearsal": {"wanted": wanted, "real": len(rehearsal_rows), "synthetic": len(synthetic_rows)},
            **(identity or {}),
        },
    )
