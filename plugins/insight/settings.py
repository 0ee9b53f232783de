"""The insight feature's settings: ``[dashboard]``."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from flywheel_loop.engine.config import PluginSection


class DashboardConfig(PluginSection):
    """The web dashboard ``flywheel up`` serves (``engine/dashboard``; ``flywheel dashboard`` serves it alone).

    Read-only (the default) means the dashboard exposes no actions: every route is a GET that reads
    the ``dashboard`` projection, and nothing can be published, requested or changed from a browser.
    With ``read_only = false`` each role also gets a "request training" button (a manual
    ``training.requested``, as ``flywheel train --role``); actions need a header that only the
    dashboard's own pages send (no cross-site requests), but there is no authentication, so keep
    ``host`` on a loopback address then."""

    section_name: ClassVar[str] = "dashboard"

    enabled: bool = Field(default=True, description="serve the dashboard from flywheel up")
    host: str = Field(default="127.0.0.1", min_length=1, description="the interface it listens on")
    port: int = Field(default=8765, ge=0, le=65535, description="0 = any free port (the URL is printed)")
    read_only: bool = Field(default=True, description="no actions exposed; false adds request-training buttons")
    refresh_s: float = Field(
        default=1.0, gt=0, le=60, description="how often the live stream checks the projection for new events"
    )
