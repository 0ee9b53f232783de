"""``flywheel datasets``: list the curated datasets, show one, export one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flywheel_loop.engine.commands import console, fail, say, settings


def register(app: typer.Typer) -> None:
    """Add ``flywheel datasets`` (and ``show``, ``export``) to ``app``."""
    datasets_app = typer.Typer(help="Curated datasets: list, show, export.", invoke_without_command=True)
    app.add_typer(datasets_app, name="datasets")

    @datasets_app.callback()
    def datasets_list(ctx: typer.Context) -> None:
        """List the datasets with their sizes and lineage."""
        if ctx.invoked_subcommand is None:
            from flywheel_loop.plugins.curation.store import list_datasets

            console.print(list_datasets(settings()))

    @datasets_app.command("show")
    def datasets_show(
        hash: Annotated[str, typer.Argument(help="the dataset hash (a unique prefix will do)")],
    ) -> None:
        """The balance table and sample rows of one dataset."""
        from flywheel_loop.plugins.curation.store import show_dataset
        from flywheel_loop.plugins.shared.datasets import DatasetNotFound

        try:
            for renderable in show_dataset(settings(), hash):
                console.print(renderable)
        except DatasetNotFound as exc:
            fail(str(exc))

    @datasets_app.command("export")
    def datasets_export(
        hash: Annotated[str, typer.Argument(help="the dataset hash (a unique prefix will do)")],
        format: Annotated[str, typer.Option(help="jsonl, parquet or hf")] = "jsonl",
        out: Annotated[Path, typer.Option(help="the folder to write")] = Path("dataset-export"),
    ) -> None:
        """Copy a dataset out as JSON lines, Parquet, or a Hugging Face dataset folder."""
        from flywheel_loop.plugins.curation.store import export_dataset
        from flywheel_loop.plugins.shared.datasets import DatasetNotFound

        try:
            path = export_dataset(settings(), hash, format, out)
        except (DatasetNotFound, ValueError, FileExistsError) as exc:
            fail(str(exc))
        say(f"exported to {path}")
