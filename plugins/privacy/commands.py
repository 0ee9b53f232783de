"""``flywheel forget --session ID | --user ID``: erase a data subject's raw intake, shred its text on the
log and announce it.

What it does is in ``forgetting.py``: the subject's raw messages are erased from the raw stream, the
keys its text on the log is sealed under are destroyed, and a ``data.forgotten`` goes on the log; the
running engine (or the next
``flywheel up``) then deletes the subject's scores, evidence and vectors and rebuilds the
datasets that held its data. Without ``--yes`` the command shows what it found and asks first.
"""

from __future__ import annotations

import getpass
from typing import Annotated, Any

import typer
from rich.table import Table

from flywheel_loop.engine.commands import console, fail, open_bus, run, say, settings


def _summary(report: Any) -> Table:
    table = Table(title=f"{report.subject} {report.subject_hash} (keyed hash)", show_header=False)
    table.add_column("what")
    table.add_column("count", justify="right")
    c = report.counts
    table.add_row("raw messages (interactions, feedback, outcomes)", str(c.get("raw_messages", 0)))
    table.add_row("interactions", str(c.get("interactions", 0)))
    table.add_row("anonymized feedback / outcomes on the log", f"{c.get('feedback', 0)} / {c.get('outcomes', 0)}")
    table.add_row("scores on the log", str(c.get("scores", 0)))
    table.add_row("data keys of their text on the log (destroyed)", str(c.get("keys", 0)))
    table.add_row("already forgotten before", str(report.already_forgotten))
    table.add_row("datasets holding them (rebuilt by the engine)", str(len(report.datasets)))
    return table


def register(app: typer.Typer) -> None:
    """Add ``flywheel forget`` to ``app``."""

    @app.command()
    def forget(
        session: Annotated[str | None, typer.Option(help="the session id, as the agent recorded it")] = None,
        user: Annotated[str | None, typer.Option(help="the user id, as the agent recorded it")] = None,
        reason: Annotated[str, typer.Option(help="why (kept in the data.forgotten event)")] = "",
        requested_by: Annotated[
            str | None, typer.Option(help="who asked (kept in the event); default: the current OS user")
        ] = None,
        yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask for confirmation")] = False,
        dry_run: Annotated[bool, typer.Option("--dry-run", help="only show what would be forgotten")] = False,
    ) -> None:
        """Erase a session's or a user's raw data, shred its text on the log, and have every projection and
        dataset drop it."""
        from flywheel_loop.plugins.privacy.forgetting import ForgetError
        from flywheel_loop.plugins.privacy.forgetting import forget as do_forget

        if (session is None) == (user is None):
            fail("give exactly one of --session ID or --user ID")
        cfg = settings()
        who = requested_by or getpass.getuser()

        async def go() -> Any:
            async with open_bus(cfg) as bus:
                kwargs: dict[str, Any] = dict(session=session, user=user, reason=reason, requested_by=who)
                preview = await do_forget(cfg, bus, dry_run=True, **kwargs)
                console.print(_summary(preview))
                if not preview.found:
                    say(f"nothing recorded for this {preview.subject}: nothing to forget")
                    return preview
                if preview.nothing_new:
                    say(f"this {preview.subject} was forgotten before: nothing new to erase")
                    return preview
                if dry_run:
                    console.print("dry run: nothing was erased or announced")
                    return preview
                if not yes and not typer.confirm(
                    f"erase this {preview.subject}'s raw messages, destroy its data keys and announce data.forgotten?",
                    default=False
                ):
                    console.print("nothing done")
                    return preview
                return await do_forget(cfg, bus, **kwargs)

        try:
            report = run(go)
        except ForgetError as exc:
            fail(str(exc))
        if report.announced:
            console.print(
                f"erased {report.raw_deleted} raw messages ({report.raw_already_gone} were already gone);"
                f" destroyed {report.keys_destroyed} data keys (the text on the log they sealed is unreadable);"
                f" announced data.forgotten {', '.join(report.announced)}"
            )
            console.print(
                "the engine deletes the scores, evidence and vectors of these interactions and rebuilds"
                f" {len(report.datasets)} dataset(s) when it handles the event (now, or at the next flywheel up)"
            )
