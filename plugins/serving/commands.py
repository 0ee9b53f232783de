"""``flywheel deployments`` (what is in service per role) and ``flywheel rollback --role ROLE``.

Both read or write the log like everything else: the table is the ``deployments`` projection
(``plugins/serving/deployments.py``) caught up to the end of the log, and a rollback is a ``rollback.requested`` event
that the running deployer answers with ``deployment.rolled_back`` (or ``deployment.failed`` and the reason).
"""

from __future__ import annotations

import sys
from typing import Annotated, Any

import orjson
import typer
from pydantic import ValidationError
from rich.table import Table

from flywheel_loop.engine.commands import catch_up_projections, console, fail, open_bus, run, say, settings
from flywheel_loop.engine.config import Settings


def deployments_data(settings: Settings, role: str | None = None, history: int = 10) -> list[dict[str, Any]]:
    """Per role: the version in service, the canary split, the versions kept, and the recent history."""
    from flywheel_loop.plugins.serving.deployments import read_book

    book = read_book(settings)
    if book is None:
        return []
    try:
        rows = []
        for name in book.roles():
            if role is not None and name != role:
                continue
            service = book.service(name)
            rows.append({
                "role": name,
                "in_service": None if service is None else {
                    "model_name": service.model_name,
                    "adapter_hash": service.adapter_hash,
                    "runtime": service.runtime,
                    "endpoint": service.endpoint,
                    "traffic_share": service.traffic_share,
                    "since": service.since,
                    "since_id": service.since_id,
                },
                "canary": None if service is None or service.sharing_with is None else {
                    "model_name": service.model_name,
                    "traffic_share": service.traffic_share,
                    "previous_model_name": service.sharing_with,
                    "previous_traffic_share": round(1.0 - service.traffic_share, 6),
                },
                "kept": [
                    {"model_name": v.model_name, "adapter_hash": v.adapter_hash, "runtime": v.runtime,
                     "deployed_at": v.deployed_at, "evaluation_id": v.evaluation_id}
                    for v in book.kept(name)
                ],
                "history": [
                    {"time": h.time, "kind": h.kind, "model_name": h.model_name, "to_model_name": h.to_model_name,
                     "detail": h.detail, "event_id": h.event_id}
                    for h in book.history(name, limit=history)
                ],
            })
        return rows
    finally:
        book.db.close()


def _tables(rows: list[dict[str, Any]]) -> list[Table]:
    service = Table(title="in service")
    for column in ("role", "model", "runtime", "traffic", "endpoint", "since", "kept for rollback"):
        service.add_column(column)
    history = Table(title="history (newest first)")
    for column in ("time", "role", "what", "model", "to", "detail"):
        history.add_column(column)
    for row in rows:
        s = row["in_service"]
        traffic = "-"
        if s is not None:
            traffic = f"{s['traffic_share']:.0%}"
            if row["canary"]:
                c = row["canary"]
                traffic += f" (canary; {c['previous_model_name']} {c['previous_traffic_share']:.0%})"
        service.add_row(
            row["role"],
            s["model_name"] if s else "-",
            s["runtime"] if s else "-",
            traffic,
            (s["endpoint"] or "-") if s else "-",
            s["since"][:19] if s else "-",
            ", ".join(k["model_name"] for k in row["kept"]) or "-",
        )
        for h in row["history"]:
            history.add_row(h["time"][:19], row["role"], h["kind"], h["model_name"] or "-", h["to_model_name"] or "-",
                            h["detail"])
    return [service, history]


def register(app: typer.Typer) -> None:
    """Add ``flywheel deployments`` and ``flywheel rollback`` to ``app``."""

    @app.command()
    def deployments(
        role: Annotated[str | None, typer.Option(help="only this role")] = None,
        history: Annotated[int, typer.Option(help="history entries shown per role")] = 10,
        as_json: Annotated[bool, typer.Option("--json")] = False,
    ) -> None:
        """What is in service per role: model, runtime, traffic share (canary), versions kept, rollbacks."""
        cfg = settings()
        catch_up_projections(cfg, ["deployments"])
        rows = deployments_data(cfg, role, history)
        if as_json:
            sys.stdout.write(orjson.dumps(rows).decode() + "\n")
            return
        if not rows:
            say("nothing deployed yet" + (f" for role {role}" if role else ""))
            return
        for table in _tables(rows):
            console.print(table)

    @app.command()
    def rollback(
        role: Annotated[str, typer.Option(help="the agent role whose previous version goes back in service")],
        reason: Annotated[str, typer.Option(help="why (kept in the event)")] = "requested with flywheel rollback",
    ) -> None:
        """Put a role's previous version back in service (a `rollback.requested` the deployer answers)."""
        from flywheel_loop.schemas import RollbackRequested, describe_validation_error, new_event

        try:
            request = RollbackRequested(role=role, reason=reason or "requested with flywheel rollback")
        except ValidationError as exc:
            fail(f"{describe_validation_error(exc)} (given --role {role!r})")
        cfg = settings()

        async def main() -> Any:
            async with open_bus(cfg) as bus:
                event = new_event(request, source="cli")
                await bus.publish(event)
                return event

        event = run(main)
        say(
            f"rollback requested for {role} ({event.id}); the deployer answers with deployment.rolled_back"
            " (see `flywheel deployments`)"
        )
