"""``flywheel rounds``: the rounds of learning from verified attempts, with their figures."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from flywheel_loop.engine.commands import console, open_bus, run, settings

if TYPE_CHECKING:
    from flywheel_loop.plugins.shared.rounds import Round


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

        from flywheel_loop.plugins.shared.rounds import ROUND_EVENTS, fold_rounds, rounds_table

        cfg = settings()

        async def read() -> list[Round]:
            async with open_bus(cfg, ensure_streams=False) as bus:
                return fold_rounds(await bus.read_log(ROUND_EVENTS), role)

        found = run(read)
        if json:
            console.print_json(orjson.dumps({"rounds": [r.as_dict() for r in found]}).decode())
            return
        console.print(rounds_table(found))
