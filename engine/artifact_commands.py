"""``flywheel artifacts``: what is in the object store, and moving folders between it and this state folder.

- ``flywheel artifacts list [--kind K] [--json]``: every object on the bus (name, size, chunks,
  SHA-256, a run's step);
- ``flywheel artifacts push [--kind K]``: publish the content-addressed folders of this state
  folder that the bus does not have yet (datasets, adapters, base models; run checkpoints are
  published by the trainer as it goes), e.g. a state folder made before artifacts were on the bus;
- ``flywheel artifacts pull KIND KEY``: fetch one into this state folder (checked against the
  object's SHA-256; the features also check the content hash when they use it).
"""

from __future__ import annotations

import sys
from typing import Annotated

import orjson
import typer
from rich.table import Table

from flywheel_loop.engine import commands as cmd
from flywheel_loop.engine.artifacts import KINDS, ArtifactError, ArtifactInfo
from flywheel_loop.engine.connection import open_bus

__all__ = ["artifacts_app"]

#: what ``push`` publishes by default: the kinds named by their content
CONTENT_ADDRESSED = ("datasets", "adapters", "models")

artifacts_app = typer.Typer(
    help="Artifacts on the bus: datasets, adapters, run checkpoints and base models.", no_args_is_help=True
)


def _kind(value: str | None) -> str | None:
    if value is not None and value not in KINDS:
        cmd.fail(f"--kind {value!r}: one of {', '.join(KINDS)}")
    return value


def _row(a: ArtifactInfo) -> dict[str, object]:
    return {"name": a.name, "size": a.size, "chunks": a.chunks, "sha256": a.sha256, "modified": a.modified,
            "headers": dict(a.headers)}


@artifacts_app.command("list")
def artifacts_list(
    kind: Annotated[str | None, typer.Option(help="datasets, adapters, runs or models")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Every artifact on the bus."""
    settings = cmd.settings()
    wanted = _kind(kind)

    async def main() -> list[ArtifactInfo]:
        async with open_bus(settings) as bus:
            return await bus.artifacts.objects(wanted)

    found = cmd.run(main)
    if as_json:
        sys.stdout.write(orjson.dumps([_row(a) for a in found]).decode() + "\n")
        return
    table = Table("name", "size", "chunks", "sha256", "step", title=f"artifacts on the bus ({len(found)})")
    for a in found:
        step = a.headers.get("Flywheel-Step", "")
        if a.headers.get("Flywheel-Completed") == "true":
            step += " (completed)"
        table.add_row(a.name, f"{a.size:,}", str(a.chunks), a.sha256[:16], step)
    cmd.console.print(table)


@artifacts_app.command("push")
def artifacts_push(
    kind: Annotated[list[str] | None, typer.Option(help="only these kinds (default: datasets, adapters, models)")]
    = None,
) -> None:
    """Publish this state folder's datasets, adapters and base models that the bus does not have."""
    settings = cmd.settings()
    kinds = [k for k in (kind or CONTENT_ADDRESSED) if _kind(k)]

    async def main() -> tuple[int, int]:
        published = present = 0
        async with open_bus(settings) as bus:
            for k in kinds:
                root = settings.layout.root / k
                folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) \
                    if root.is_dir() else []
                for folder in folders:
                    if await bus.artifacts.info(k, folder.name) is not None:
                        present += 1
                        continue
                    await bus.artifacts.publish(k, folder.name, folder)
                    cmd.say(f"published {k}/{folder.name}")
                    published += 1
        return published, present

    published, present = cmd.run(main)
    cmd.say(f"{published} published, {present} already on the bus")


@artifacts_app.command("pull")
def artifacts_pull(
    kind: Annotated[str, typer.Argument(help="datasets, adapters, runs or models")],
    key: Annotated[str, typer.Argument(help="the artifact's key: a hash, a run id, a model's name")],
) -> None:
    """Fetch one artifact from the bus into this state folder."""
    settings = cmd.settings()
    _kind(kind)

    async def main() -> str:
        async with open_bus(settings) as bus:
            try:
                return str(await bus.artifacts.fetch(kind, key))
            except (ArtifactError, ValueError) as exc:
                cmd.fail(str(exc), code=1)

    cmd.say(cmd.run(main))
