"""The ``deployments`` projection: what is in service per role (the deployment book,
``plugins/shared/deployment_book.py``), for ``flywheel deployments``, the dashboard and the gateway."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from flywheel_loop.engine.config import Settings
from flywheel_loop.engine.projection import Projection
from flywheel_loop.plugins.shared.deployment_book import BOOK_EVENTS, TABLES, DeploymentBook
from flywheel_loop.schemas import Event

__all__ = ["Deployments", "projection_file", "read_book"]


class Deployments(Projection):
    """The ``deployments`` read model: the book, folded from the log."""

    name = "deployments"
    consumes = BOOK_EVENTS
    tables = TABLES

    def apply(self, db: sqlite3.Connection, event: Event[Any], seq: int) -> None:
        DeploymentBook(db, create=False).apply(event, seq)


def projection_file(settings: Settings) -> Path:
    """Where the ``deployments`` projection lives."""
    return settings.layout.projection(Deployments.name)


def read_book(settings: Settings) -> DeploymentBook | None:
    """The ``deployments`` projection as a book to read (None before it was ever folded). It is as recent as
    the projection: ``flywheel up`` keeps it current, ``flywheel deployments`` catches it up first."""
    path = projection_file(settings)
    if not path.is_file():
        return None
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
    try:
        db.execute("SELECT 1 FROM service LIMIT 1")
    except sqlite3.OperationalError:  # created by another version of the projection, or empty
        db.close()
        return None
    return DeploymentBook(db, create=False)
