"""Built-in processor ``dataset_builder``: ``training.requested`` in, a dataset folder and
``dataset.built`` (or ``dataset.skipped``, with the reason) out.

For a request covering log position P, it reads the log from its first event up to P (a fresh
consumer over ``interaction.anonymized``, ``feedback.anonymized``, ``quality.assessed`` and
``dataset.built``; raw events are never read), folds the role's evidence and builds the
dataset with the recipe in ``plugins/curation.py``, formats the rows with the base model's
chat template (``plugins/chat_format.py``), and writes a content-addressed folder
(``plugins/dataset_store.py``). Prompt vectors come from the embedder's LanceDB store; any
missing there are computed and stored on the spot.

The build depends on nothing but the log up to P and the configuration, so
``rebuild_dataset(settings, bus, role, P)`` (``flywheel replay --until P --dataset ROLE``)
gives the same hash, also after the state folder was deleted.

**Forgetting.** The builder also consumes ``data.forgotten``: every current dataset (built, or
the replacement of a superseded one) whose lineage holds a forgotten event is rebuilt at its
own log position without the forgotten interactions; a ``dataset.superseded`` (old hash, new
hash, the ``data.forgotten`` id) announces the replacement and the old folder is deleted. A
dataset the forgetting does not touch rebuilds to its own hash and is left alone. Builds and
rebuilds always leave out everything forgotten anywhere on the log, so a replay gives the
replacement, never the superseded dataset.

No dataset is written when there is nothing to build from (no interactions for the role, none
clearing the quality bar, fewer new ones than ``min_examples``), when the base model is
missing, or when a request claims a position after its own; each ends in a ``dataset.skipped``
whose ``detail`` says why, and the trigger stops waiting for that run.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pluggy

from engine.bus import Bus
from engine.config import Settings
from engine.connection import open_bus
from engine.hookspecs import hookimpl
from engine.memo import OutputMemo
from engine.processor import ProcessContext, Processor
from plugins.chat_format import BaseModelMissing, load_formatter
from plugins.curation import (
    READ_TYPES,
    BuiltDataset,
    Example,
    Skip,
    SkipReason,
    build_dataset,
    fold_log,
    forgotten_ids,
)
from plugins.dataset_store import dataset_root, read_lineage, remove_dataset, write_dataset
from plugins.vectors import VectorStore, embedding_text, shared_embedder, vectors_for, vectors_path
from schemas import (
    DataForgotten,
    DatasetBuilt,
    DatasetSkipped,
    DatasetSuperseded,
    Event,
    InvalidEvent,
    TrainingRequested,
    parse_event,
    subject_for,
)

__all__ = [
    "CurrentDataset",
    "DatasetNotBuilt",
    "Outcome",
    "build_from_log",
    "current_datasets",
    "read_forgotten",
    "read_log",
    "rebuild_dataset",
]

log = logging.getLogger(__name__)


class DatasetNotBuilt(RuntimeError):
    """A rebuild that ends without a dataset; ``reason`` and the message say why."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Outcome:
    """A built dataset (hash, folder and what describes it) or the reason there is none."""

    skip: Skip | None = None
    digest: str = ""
    path: Path | None = None
    built: BuiltDataset | None = None


async def read_log(bus: Bus, until_seq: int, types: tuple[str, ...] = READ_TYPES) -> list[tuple[int, Event[Any]]]:
    """(sequence, event) of every event of ``types`` on the log up to ``until_seq``, in order.

    A message that does not validate is skipped (the worker that met it live rejected it)."""
    out: list[tuple[int, Event[Any]]] = []
    async for seq, data in bus.scan("log", [subject_for(t) for t in types], until_seq=until_seq):
        try:
            out.append((seq, parse_event(data)))
        except InvalidEvent:
            continue
    return out


async def read_forgotten(bus: Bus) -> frozenset[str]:
    """Every interaction and event id forgotten anywhere on the log (``data.forgotten``)."""
    subject = subject_for("data.forgotten")
    info = await bus.js.stream_info(bus.streams.log, subjects_filter=subject)
    if not (info.state.subjects or {}).get(subject):
        return frozenset()  # the common case, without waiting on an empty consumer
    return forgotten_ids(await read_log(bus, int(info.state.last_seq), ("data.forgotten",)))


@dataclass(frozen=True)
class CurrentDataset:
    """A dataset that is not superseded, as the log describes it."""

    digest: str
    role: str
    log_position: int
    lineage: tuple[str, ...]
    lineage_complete: bool


def current_datasets(events: list[tuple[int, Event[Any]]]) -> dict[str, CurrentDataset]:
    """hash -> the datasets ``dataset.built`` and ``dataset.superseded`` events leave current."""
    current: dict[str, CurrentDataset] = {}
    for _, event in events:
        d = event.data
        if isinstance(d, DatasetBuilt):
            complete = d.lineage_total <= len(d.lineage)
            current[d.dataset_hash] = CurrentDataset(d.dataset_hash, d.role, d.log_position, tuple(d.lineage), complete)
        elif isinstance(d, DatasetSuperseded):
            current.pop(d.old_hash, None)
            if d.new_hash:
                complete = d.lineage_total <= len(d.lineage)
                current[d.new_hash] = CurrentDataset(d.new_hash, d.role, d.log_position, tuple(d.lineage), complete)
    return current


def _synthesizer(hooks: pluggy.HookRelay | None, settings: Settings) -> Callable[..., list[dict[str, Any]]] | None:
    if hooks is None:
        return None

    def synthesize(role: str, examples: list[dict[str, Any]], wanted: int) -> list[dict[str, Any]]:
        answers = hooks.synthesize_rehearsal(role=role, examples=examples, wanted=wanted, settings=settings)
        return [row for answer in answers if answer for row in answer]

    return synthesize


def _build(settings: Settings, events: list[tuple[int, Event[Any]]], role: str, position: int,
           hooks: pluggy.HookRelay | None, forgotten: frozenset[str] = frozenset()) -> Outcome:
    """The CPU part of a build (run in a thread): fold, build, write."""
    curation = settings.curation
    try:
        formatter = load_formatter(curation.dataset.base_model, settings.state_dir / "cache" / "tokenizers")
    except BaseModelMissing as exc:
        return Outcome(skip=Skip("base_model_missing", str(exc)[:2000]))
    evidence = fold_log(events, role, curation, position, forgotten)
    embedder = shared_embedder(curation.embedding)
    store: VectorStore | None = None

    def vectors(examples: list[Example]) -> Any:
        nonlocal store
        if store is None:
            store = VectorStore(vectors_path(settings.state_dir), embedder.key)
        return vectors_for(
            [e.interaction_id for e in examples],
            [e.role for e in examples],
            [embedding_text(e.prompt) for e in examples],
            store,
            embedder,
        )

    result = build_dataset(
        evidence,
        curation,
        formatter,
        vectors,
        synthesize=_synthesizer(hooks, settings),
        identity={"embedding": {"model": embedder.name, "key": embedder.key}},
    )
    if isinstance(result, Skip):
        return Outcome(skip=result)
    digest, path = write_dataset(result, dataset_root(settings))
    return Outcome(digest=digest, path=path, built=result)


async def build_from_log(
    settings: Settings, bus: Bus, role: str, position: int, hooks: pluggy.HookRelay | None = None
) -> Outcome:
    """Read the log up to ``position`` and build ``role``'s dataset from it, leaving out what
    was forgotten anywhere on the log."""
    events = await read_log(bus, position)
    forgotten = await read_forgotten(bus)
    return await asyncio.to_thread(_build, settings, events, role, position, hooks, forgotten)


def _hooks(settings: Settings) -> pluggy.HookRelay:
    from engine.plugin_host import PluginHost

    host = PluginHost(settings)
    host.configure()
    return host.pm.hook


async def rebuild_dataset(
    settings: Settings, bus: Bus, role: str, until_seq: int, hooks: pluggy.HookRelay | None = None
) -> tuple[str, Path]:
    """Rebuild ``role``'s dataset as of log position ``until_seq`` (the ``log_position`` of its
    ``dataset.built``); return (hash, folder). Vectors missing from the store (or the whole
    store, after the state folder was deleted) are recomputed from the log's text. Data
    forgotten since (``data.forgotten``) is left out: the result is then the dataset's
    replacement (its ``dataset.superseded``), not the original. Raises
    ``DatasetNotBuilt`` with the reason when there is no dataset to build."""
    outcome = await build_from_log(settings, bus, role, until_seq, hooks if hooks is not None else _hooks(settings))
    if outcome.skip is not None:
        raise DatasetNotBuilt(outcome.skip.reason, outcome.skip.detail)
    assert outcome.path is not None
    return outcome.digest, outcome.path


class DatasetBuilder:
    """The processor: one build per request; a redelivered request answers from its record."""

    def __init__(self) -> None:
        self.memos: dict[Path, OutputMemo] = {}

    def _memo(self, state_dir: Path) -> OutputMemo:
        if state_dir not in self.memos:
            state_dir.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(state_dir / "builds.sqlite", isolation_level=None, check_same_thread=False)
            self.memos[state_dir] = OutputMemo(db)
        return self.memos[state_dir]

    @staticmethod
    def _answered(memo: OutputMemo, event_id: str) -> list[Any] | None:
        answered = memo.recall(event_id)
        for out in answered or ():
            if isinstance(out, DatasetBuilt) and not (Path(out.path) / "manifest.json").is_file():
                return None  # the folder was deleted: build it again
        return answered

    async def handle(self, event: Event[Any], ctx: ProcessContext) -> list[Any]:
        if isinstance(event.data, DataForgotten):
            return await self.supersede(event, ctx)
        req = event.data
        if not isinstance(req, TrainingRequested):
            return []
        memo = self._memo(ctx.state_dir)
        answered = self._answered(memo, event.id)
        if answered is not None:
            return answered

        def skipped(reason: SkipReason, detail: str) -> DatasetSkipped:
            return DatasetSkipped(
                role=req.role, request_id=event.id, log_position=req.log_position, reason=reason, detail=detail
            )

        output: DatasetBuilt | DatasetSkipped
        if ctx.sequence and req.log_position >= ctx.sequence:
            output = skipped(
                "invalid_request",
                f"the request at log position {ctx.sequence} claims to cover position {req.log_position},"
                " which was not written yet",
            )
        else:
            async with open_bus(ctx.settings, ensure_streams=False) as bus:
                outcome = await build_from_log(ctx.settings, bus, req.role, req.log_position, ctx.hooks)
            if outcome.skip is not None:
                output = skipped(outcome.skip.reason, outcome.skip.detail)
                ctx.log.warning("no %s dataset for request %s: %s", req.role, event.id, outcome.skip.detail)
            else:
                built = outcome.built
                assert built is not None and outcome.path is not None
                cap = ctx.settings.curation.dataset.lineage_in_event
                output = DatasetBuilt(
                    role=req.role,
                    dataset_hash=outcome.digest,
                    request_id=event.id,
                    sizes=built.sizes,
                    balance=built.balance,
                    rehearsal_share=built.rehearsal_share,
                    lineage=built.lineage[:cap],
                    path=str(outcome.path),
                    log_position=req.log_position,
                    lineage_total=len(built.lineage),
                )
        memo.remember(event.id, [output], replace=True)  # replaces a build whose folder was deleted
        return [output]


    async def supersede(self, event: Event[Any], ctx: ProcessContext) -> list[Any]:
        """Rebuild every current dataset that holds forgotten data; announce each replacement
        with ``dataset.superseded`` and delete the old folder."""
        forgotten = event.data
        assert isinstance(forgotten, DataForgotten)
        memo = self._memo(ctx.state_dir)
        answered = memo.recall(event.id)
        if answered is not None:
            return answered
        ids = set(forgotten.interaction_ids) | set(forgotten.event_ids)
        root = dataset_root(ctx.settings)
        outputs: list[DatasetSuperseded] = []
        async with open_bus(ctx.settings, ensure_streams=False) as bus:
            # Up to the end of the log, not just to this event: a dataset built before the
            # forgetting may have been announced after it.
            history = await read_log(bus, await bus.last_sequence("log"), ("dataset.built", "dataset.superseded"))
            current = current_datasets(history)
            for ds in sorted(current.values(), key=lambda c: (c.role, c.log_position, c.digest)):
                lineage = read_lineage(root / ds.digest)
                if lineage is None and ds.lineage_complete:
                    lineage = list(ds.lineage)
                if lineage is not None and ids.isdisjoint(lineage):
                    continue  # holds nothing forgotten (without a full lineage, the rebuild tells)
                outcome = await build_from_log(ctx.settings, bus, ds.role, ds.log_position, ctx.hooks)
                if outcome.digest == ds.digest:
                    continue
                outputs.append(self._superseded(ctx, event.id, ds, lineage, outcome))
        memo.remember(event.id, outputs, replace=True)
        for out in outputs:
            if remove_dataset(root, out.old_hash):
                ctx.log.info("dataset %s superseded by %s; its folder is deleted", out.old_hash[:16],
                             (out.new_hash or "nothing")[:16])
        return outputs

    @staticmethod
    def _superseded(ctx: ProcessContext, forgotten_id: str, old: CurrentDataset, old_lineage: list[str] | None,
                    outcome: Outcome) -> DatasetSuperseded:
        common: dict[str, Any] = dict(
            role=old.role, old_hash=old.digest, forgotten_id=forgotten_id, log_position=old.log_position
        )
        if outcome.skip is not None:
            return DatasetSuperseded(
                **common,
                removed=len(old_lineage or ()),
                detail=f"nothing left to build without the forgotten data: {outcome.skip.detail}"[:2000],
            )
        built = outcome.built
        assert built is not None and outcome.path is not None
        removed = len(set(old_lineage) - set(built.lineage)) if old_lineage is not None else 0
        cap = ctx.settings.curation.dataset.lineage_in_event
        return DatasetSuperseded(
            **common,
            new_hash=outcome.digest,
            removed=removed,
            sizes=built.sizes,
            lineage=built.lineage[:cap],
            lineage_total=len(built.lineage),
            path=str(outcome.path),
            detail=f"rebuilt at log position {old.log_position} without forgotten data",
        )


@hookimpl
def register_processors(register: Callable[[Processor], None], settings: Settings) -> None:
    register(
        Processor(
            name="dataset_builder",
            consumes=("training.requested", "data.forgotten"),
            handle=DatasetBuilder().handle,
            description="builds a content-addressed SFT + DPO dataset with rehearsal for each training request;"
            " rebuilds the datasets that held forgotten data",
            batch=1,
        )
    )
