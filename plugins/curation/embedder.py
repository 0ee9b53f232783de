"""Built-in processor ``embedder``: every anonymized interaction's prompt, embedded into LanceDB.

It consumes ``interaction.anonymized`` and emits nothing; the vectors (all-MiniLM-L6-v2, see
``plugins/vectors.py``) go to ``<state_dir>/vectors``, merged by interaction id, so a
redelivered event rewrites the same row. Prompts are gathered into batches of
``curation.embedding.batch`` (or whatever arrived within ``flush_s``) because one forward pass
per prompt is several times slower.

A ``data.forgotten`` drops the listed interactions from the pending batch and deletes their
vectors from the store (``VectorStore.delete`` also compacts the files that held them); an
``interaction.anonymized`` of a forgotten interaction that arrives later is not embedded.

The store is a cache of a pure function of the log, not a source of truth: the dataset
builder embeds (and stores) any interaction it finds missing, so a batch lost in a crash, or a
deleted state folder, costs time, never correctness.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from flywheel_loop.engine.config import Settings
from flywheel_loop.engine.processor import ProcessContext, Processor
from flywheel_loop.plugins.curation.settings import CurationConfig
from flywheel_loop.plugins.curation.vectors import VectorStore, embedding_text, shared_embedder
from flywheel_loop.schemas import DataForgotten, Event, InteractionAnonymized

__all__ = ["Embedder"]

log = logging.getLogger(__name__)


class Embedder:
    """Collects prompts and writes their vectors in batches."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.config = CurationConfig.of(settings).embedding
        self.pending: dict[str, tuple[str, str]] = {}  # interaction id -> (role, text)
        self.lock = asyncio.Lock()
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None  # the timer's flush, kept so it is not collected
        self.store: VectorStore | None = None
        self.written = 0
        self.forgotten: set[str] = set()

    async def handle(self, event: Event[Any], ctx: ProcessContext) -> list[Any]:
        data = event.data
        if isinstance(data, DataForgotten):
            await self.forget(data.interaction_ids)
            return []
        if not isinstance(data, InteractionAnonymized) or data.interaction_id in self.forgotten:
            return []
        self.pending[data.interaction_id] = (data.interaction.role, embedding_text(data.interaction.input))
        if len(self.pending) >= self.config.batch:
            await self.flush()
        elif self.timer is None:
            loop = asyncio.get_running_loop()
            self.timer = loop.call_later(self.config.flush_s, self._on_timer, loop)
        return []

    def _on_timer(self, loop: asyncio.AbstractEventLoop) -> None:
        self.timer = None
        if not loop.is_closed():
            self.task = loop.create_task(self._flush_quietly())

    async def _flush_quietly(self) -> None:
        try:
            await self.flush()
        except Exception:  # a timer has no caller to raise to; the builder fills any gap
            log.exception("embedder: writing a batch of vectors failed")

    async def flush(self) -> None:
        """Embed and store what is pending (a failure puts it back for the next try)."""
        async with self.lock:
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            batch, self.pending = self.pending, {}
            if not batch:
                return
            try:
                await asyncio.to_thread(self._write, batch)
            except BaseException:
                self.pending = {**batch, **self.pending}
                raise
            self.written += len(batch)

    async def forget(self, interaction_ids: list[str]) -> int:
        """Drop these interactions from the pending batch and delete their stored vectors."""
        async with self.lock:  # after any flush in progress, so nothing is written back after
            self.forgotten.update(interaction_ids)
            for iid in interaction_ids:
                self.pending.pop(iid, None)
            deleted = await asyncio.to_thread(self._delete, interaction_ids)
        if deleted:
            log.info("embedder: deleted the vectors of %d forgotten interactions", deleted)
        return deleted

    def _delete(self, interaction_ids: list[str]) -> int:
        """Delete from every table of the store (older embedding setups keep their own)."""
        if self.store is None:
            embedder = shared_embedder(self.config, self.settings.state_dir)
            self.store = VectorStore(self.settings.layout.vectors, embedder.key)
        deleted = self.store.delete(interaction_ids)
        for key in self.store.other_keys():
            deleted += VectorStore(self.store.path, key).delete(interaction_ids)
        return deleted

    def _write(self, batch: dict[str, tuple[str, str]]) -> None:
        ids = sorted(batch)
        embedder = shared_embedder(self.config, self.settings.state_dir)
        if self.store is None:
            self.store = VectorStore(self.settings.layout.vectors, embedder.key)
        vectors = embedder.embed([batch[i][1] for i in ids])
        self.store.upsert(ids, [batch[i][0] for i in ids], vectors)


def processor(settings: Settings) -> Processor:
    """The embedder processor, configured by ``settings``."""
    return Processor(
        name="embedder",
        consumes=("interaction.anonymized", "data.forgotten"),
        handle=Embedder(settings).handle,
        description="embeds every anonymized prompt into LanceDB (dedupe and rehearsal)",
    )
