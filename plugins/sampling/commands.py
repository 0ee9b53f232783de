"""``flywheel rounds``: the rounds of learning from verified attempts, with their figures."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from flywheel_loop.engine.commands import console, open_bus, run, settings

if TYPE_CHECKING:
    from flywheel_loop.plugins.sampling.rounds import Round


def register(app: typer.Typer) -> None:
    """Add ``flywheel rounds`` to ``app``."""

    @app.command()
    def rounds(
        role: Annotated[str | None, typer.Option(help="only this role")] = None,
        json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    ) -> None:
        """Each round (sample -> build -> train -> gate -> deploy): tasks, samples, the sampler's pass@k,
        the rows it added, the gate's verdict."""
        import orjson
        from rich.table import Table

        from flywheel_loop.plugins.sampling.rounds import ROUND_EVENTS, fold_rounds

        cfg = settings()

        async def read() -> list[Round]:
            async with open_bus(cfg, ensure_streams=False) as bus:
                return list(fold_rounds(await bus.read_log(ROUND_EVENTS), role))

        found = run(read)
        if json:
            console.print_json(orjson.dumps({"rounds": [r.as_dict() for r in found]}).decode())
            return
        t = Table("round", "role", "model sampled", "tasks", "samples", "pass@1", "pass@k", "rows added", "pairs",
                  "dataset", "run", "stage", title="rounds (flywheel train --method rft)")
        for n, r in enumerate(found, 1):
            t.add_row(str(n), r.role, r.model_version, str(r.tasks), str(r.samples), f"{r.pass_at_1:.3f}",
                      f"{r.pass_at_k:.3f} (k={r.k})", str(r.rows_added if r.rows_added is not None else "-"),
                      str(r.pairs_added if r.pairs_added is not None else "-"), (r.dataset or "-")[:12],
                      r.run_id or "-", r.stage)
        console.print(t)
