"""Built-in processor ``dataset_builder``: ``training.requested`` in, a dataset folder and
``dataset.built`` (or ``dataset.skipped``, with the reason) out.

A ``sampling.completed`` (the sampler's round of verified attempts) is a request too, covering its
own position: the round's passing answers become rows and pairs (``recipe.py``, step 9).

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

**On the bus.** A built dataset is published as the object ``datasets/<hash>``
(``engine/artifacts.py``) before its ``dataset.built`` is, so a trainer or an evaluator on
another machine fetches it from there; a superseded dataset's object is erased with its folder.

**Forgetting.** The builder also consumes ``data.forgotten``: every current dataset (built, or
the replacement of a superseded one) whose lineage holds a forgotten event is rebuilt at its
own log position without the forgotten interactions; a ``dataset.superseded`` (old hash, new
hash, the ``data.forgotten`` id) announces the replacement and the old folder is deleted, here
and on the bus. A
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flywheel_loop.engine.bus import Bus
from flywheel_loop.engine.config import Settings
from flywheel_loop.engine.extensions import NothingToRebuild
from flywheel_loop.engine.plugin_host import PluginHost
from flywheel_loop.engine.processor import LogReader, ProcessContext, Processor
from flywheel_loop.plugins.curation.recipe import (
    READ_TYPES,
    BuiltDataset,
    Example,
    Skip,
    SkipReason,
    build_dataset,
    fold_log,
    forgotten_ids,
)
from flywheel_loop.plugins.curation.settings import CurationConfig
from flywheel_loop.plugins.curation.store import remove_dataset, write_dataset
from flywheel_loop.plugins.curation.vectors import VectorStore, embedding_text, shared_embedder, vectors_for
from flywheel_loop.plugins.shared.chat_format import BaseModelMissing, load_formatter
from flywheel_loop.plugins.shared.datasets import CurrentDataset, current_datasets, dataset_root, read_lineage
from flywheel_loop.schemas import (
    DataForgotten,
    DatasetBuilt,
    DatasetSkipped,
    DatasetSuperseded,
    Event,
    SamplingCompleted,
    TrainingRequested,
)

__all__ = [
    "DatasetNotBuilt",
    "Outcome",
    "build_from_log",
    "processor",
    "read_forgotten",
    "rebuild_dataset",
]

log = logging.getLogger(__name__)


class DatasetNotBuilt(NothingToRebuild):
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


Synthesize = Callable[[str, list[dict[str, Any]], int], list[dict[str, Any]]]


async def read_forgotten(read: LogReader) -> frozenset[str]:
    """Every interaction and event id forgotten anywhere on the log (``data.forgotten``)."""
    return forgotten_ids(await read(("data.forgotten",), None))


def _build(settings: Settings, events: list[tuple[int, Event[Any]]], role: str, position: int,
           synthesize: Synthesize | None, forgotten: frozenset[str] = frozenset()) -> Outcome:
    """The CPU part of a build (run in a thread): fold, build, write."""
    curation = CurationConfig.of(settings)
    try:
        formatter = load_formatter(settings.models.base, settings.layout.cache / "tokenizers")
    except BaseModelMissing as exc:
        return Outcome(skip=Skip("base_model_missing", str(exc)[:2000]))
    evidence = fold_log(events, role, curation, position, forgotten)
    embedder = shared_embedder(curation.embedding, settings.state_dir)
    store: VectorStore | None = None

    def vectors(examples: list[Example]) -> Any:
        nonlocal store
        if store is None:
            store = VectorStore(settings.layout.vectors, embedder.key)
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
        synthesize=synthesize,
        identity={"embedding": {"model": embedder.name, "key": embedder.key, "precision": embedder.precision}},
    )
    if isinstance(result, Skip):
        return Outcome(skip=result)
    digest, path = write_dataset(result, dataset_root(settings))
    return Outcome(digest=digest, path=path, built=result)


async def build_from_log(
    settings: Settings, read: LogReader, role: str, position: int, synthesize: Synthesize | None = None
) -> Outcome:
    """Read the log up to ``position`` (through ``read``: ``ctx.read_log`` or ``bus.read_log``) and
    build ``role``'s dataset from it, leaving out what was forgotten anywhere on the log."""
    events = await read(READ_TYPES, position)
    forgotten = await read_forgotten(read)
    return await asyncio.to_thread(_build, settings, events, role, position, synthesize, forgotten)


async def rebuild_dataset(
    settings: Settings, bus: Bus, role: str, until_seq: int, host: PluginHost | None = None
) -> tuple[str, Path]:
    """Rebuild ``role``'s dataset as of log position ``until_seq`` (the ``log_position`` of its
    ``dataset.built``); return (hash, folder). Vectors missing from the store (or the whole
    store, after the state folder was deleted) are recomputed from the log's text. Data
    forgotten since (``data.forgotten``) is left out: the result is then the dataset's
    replacement (its ``dataset.superseded``), not the original. Raises
    ``DatasetNotBuilt`` with the reason when there is no dataset to build."""
    if host is None:
        host = PluginHost(settings)
        host.configure()
    outcome = await build_from_log(settings, bus.read_log, role, until_seq, host.synthesize_rehearsal)
    if outcome.skip is not None:
        raise DatasetNotBuilt(outcome.skip.reason, outcome.skip.detail)
    assert outcome.path is not None
    await bus.artifacts.publish("datasets", outcome.digest, outcome.path)  # nothing to do when it is there
    return outcome.digest, outcome.path


class DatasetBuilder:
    """The processor: one build per request (a request whose outcome is on the log is not built again)."""

    async def handle(self, event: Event[Any], ctx: ProcessContext) -> list[Any]:
        if isinstance(event.data, DataForgotten):
            return await self.supersede(event, ctx)
        req = event.data
        own_position = isinstance(req, SamplingCompleted)
        if isinstance(req, SamplingCompleted):  # a round of verified attempts: built at its own position
            req = TrainingRequested(role=req.role, reason="manual", log_position=ctx.sequence, detail="sampling round")
        if not isinstance(req, TrainingRequested):
            return []

        def skipped(reason: SkipReason, detail: str) -> DatasetSkipped:
            return DatasetSkipped(
                role=req.role, request_id=event.id, log_position=req.log_position, reason=reason, detail=detail
            )

        output: DatasetBuilt | DatasetSkipped
        if ctx.sequence and req.log_position >= ctx.sequence and not own_position:
            output = skipped(
                "invalid_request",
                f"the request at log position {ctx.sequence} claims to cover position {req.log_position},"
                " which was not written yet",
            )
        else:
            synthesize = ctx.plugins.synthesize_rehearsal if ctx.plugins is not None else None
            outcome = await build_from_log(ctx.settings, ctx.read_log, req.role, req.log_position, synthesize)
            if outcome.skip is not None:
                output = skipped(outcome.skip.reason, outcome.skip.detail)
                ctx.log.warning("no %s dataset for request %s: %s", req.role, event.id, outcome.skip.detail)
            else:
                built = outcome.built
                assert built is not None and outcome.path is not None
                if ctx.artifacts is not None:  # on the bus before the event that names it
                    await ctx.artifacts.publish("datasets", outcome.digest, outcome.path)
                cap = CurationConfig.of(ctx.settings).dataset.lineage_in_event
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
                    sources=built.sources,
                )
        return [output]

    async def supersede(self, event: Event[Any], ctx: ProcessContext) -> list[Any]:
        """Rebuild every current dataset that holds forgotten data; announce each replacement
        with ``dataset.superseded`` and delete the old folder."""
        forgotten = event.data
        assert isinstance(forgotten, DataForgotten)
        ids = set(forgotten.interaction_ids) | set(forgotten.event_ids)
        root = dataset_root(ctx.settings)
        outputs: list[DatasetSuperseded] = []
        synthesize = ctx.plugins.synthesize_rehearsal if ctx.plugins is not None else None
        # Up to the end of the log, not just to this event: a dataset built before the
        # forgetting may have been announced after it.
        history = await ctx.read_log(("dataset.built", "dataset.superseded"), None)
        current = current_datasets(history)
        for ds in sorted(current.values(), key=lambda c: (c.role, c.log_position, c.digest)):
            lineage = read_lineage(root / ds.digest)
            if lineage is None and ds.lineage_complete:
                lineage = list(ds.lineage)
            if lineage is not None and ids.isdisjoint(lineage):
                continue  # holds nothing forgotten (without a full lineage, the rebuild tells)
            outcome = await build_from_log(ctx.settings, ctx.read_log, ds.role, ds.log_position, synthesize)
            if outcome.digest == ds.digest:
                continue
            if ctx.artifacts is not None and outcome.path is not None:
                await ctx.artifacts.publish("datasets", outcome.digest, outcome.path)
            outputs.append(self._superseded(ctx, event.id, ds, lineage, outcome))
        for out in outputs:
            if remove_dataset(root, out.old_hash):
                ctx.log.info("dataset %s superseded by %s; its folder is deleted", out.old_hash[:16],
                             (out.new_hash or "nothing")[:16])
            if ctx.artifacts is not None and await ctx.artifacts.delete("datasets", out.old_hash):
                ctx.log.info("dataset %s erased from the bus", out.old_hash[:16])
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
        cap = CurationConfig.of(ctx.settings).dataset.lineage_in_event
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


def processor(settings: Settings) -> Processor:
    """The builder processor, configured by ``settings``."""
    return Processor(
        name="dataset_builder",
        consumes=("training.requested", "sampling.completed", "data.forgotten"),
        handle=DatasetBuilder().handle,
        description="builds a content-addressed SFT + DPO dataset with rehearsal for each training request and each"
        " sampling round (passing answers as rows, passing-vs-failing pairs);"
        " rebuilds the datasets that held forgotten data",
        batch=1,
        produces=("dataset.built", "dataset.skipped", "dataset.superseded"),
        stateful=True,  # no tables: the fold knows which requests' datasets are on the log (exactly once)
    )
