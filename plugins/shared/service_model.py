"""The adapter in service for a role at the position of the event being handled, for features that
run the model in service (the sampler, the evaluator)."""

from __future__ import annotations

from pathlib import Path

from flywheel_loop.engine.artifacts import ArtifactCorrupt, ArtifactMissing
from flywheel_loop.engine.processor import ProcessContext
from flywheel_loop.plugins.shared.deployment_book import BOOK_EVENTS, book_at, version_name
from flywheel_loop.plugins.shared.models import AdapterUnusable, verify_adapter

__all__ = ["service_model"]


async def service_model(ctx: ProcessContext, role: str) -> tuple[str, Path | None]:
    """(the version's name, its adapter folder or None for the base model) in service for ``role`` at
    the position of the event being handled, folded from the log's deployment events; the adapter is
    fetched from the bus when this machine lacks it. ``AdapterUnusable`` when it can be had nowhere."""
    book = book_at(await ctx.read_log(BOOK_EVENTS, ctx.sequence or None))
    try:
        service = book.service(role)
    finally:
        book.db.close()
    if service is None or service.adapter_hash is None:
        return version_name(role, None), None
    digest = service.adapter_hash
    folder = ctx.layout.adapter(digest)
    if (folder / "adapter_config.json").is_file():
        return service.model_name, folder
    if ctx.artifacts is None:
        raise AdapterUnusable(f"adapter {digest} (in service for {role}) is not in {folder.parent}")
    try:
        return service.model_name, await ctx.artifacts.local("adapters", digest, verify_adapter(digest))
    except (ArtifactMissing, ArtifactCorrupt) as exc:
        raise AdapterUnusable(f"adapter {digest} (in service for {role}): {exc}") from None
