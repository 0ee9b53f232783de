"""The dashboard's FastAPI application: pages, their data as JSON, and a live stream.

- ``GET /``, ``/datasets``, ``/training``, ``/evaluations``, ``/deployments``, ``/rejections``: a page
  (a Jinja2 template); the browser fetches ``GET /api/<page>`` and draws it with plotly.js, which is
  served from the installed ``plotly`` package (no CDN: the dashboard works offline).
- ``GET /api/stream``: Server-Sent Events; one ``position`` event each time the projection folds new
  log events, on which the page fetches its data again and redraws in place (no reload).
- ``GET /pages/<path>``: a page another plugin added (``register_dashboard_pages``): a table of the
  rows its ``rows(settings)`` reads from that plugin's own projections, rendered on the server.
- ``POST /api/train/{role}``: only when the dashboard is not read-only and the host gave it a way to
  publish; requests a training run (a manual ``training.requested``, as ``flywheel train``).
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from flywheel_loop.engine.config import Settings
from flywheel_loop.engine.extensions import DashboardPage
from flywheel_loop.plugins.insight.dashboard.queries import PAGES, DashboardData

HERE = Path(__file__).parent
#: publishes a manual training request for a role; returns the new event's id
TrainingRequester = Callable[[str], Awaitable[str]]
#: the header an action request must carry (see ``train``)
ACTION_HEADER = "X-Flywheel-Action"
#: the stream sends a comment this often when nothing changes, so proxies keep the connection
KEEPALIVE_S = 15.0


def plotly_js() -> Path:
    """plotly.min.js as bundled by the ``plotly`` package (found without importing plotly)."""
    spec = importlib.util.find_spec("plotly")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the dashboard needs the plotly package: pip install plotly")
    path = Path(next(iter(spec.submodule_search_locations))) / "package_data" / "plotly.min.js"
    if not path.is_file():
        raise RuntimeError(f"plotly is installed but has no {path}; reinstall plotly")
    return path


def create_app(
    data: DashboardData,
    *,
    refresh_s: float = 1.0,
    read_only: bool = True,
    request_training: TrainingRequester | None = None,
    stopping: asyncio.Event | None = None,
    plugin_pages: Sequence[DashboardPage] = (),
    settings: Settings | None = None,
) -> FastAPI:
    """The application over ``data``. ``stopping`` ends the live streams when the host shuts down."""
    app = FastAPI(title="Flywheel dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    templates = Jinja2Templates(directory=HERE / "templates")
    stop = stopping or asyncio.Event()
    can_train = not read_only and request_training is not None
    plotly_path = plotly_js()
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    @app.get("/vendor/plotly.min.js", include_in_schema=False)
    async def plotly() -> FileResponse:
        return FileResponse(plotly_path, media_type="text/javascript")

    extra = {p.path: p for p in plugin_pages}
    nav = [*PAGES, *((f"pages/{p.path}", p.title) for p in plugin_pages)]

    def render(request: Request, page: str, context: dict[str, Any] | None = None) -> HTMLResponse:
        title = dict(nav)[page]
        return templates.TemplateResponse(
            request,
            "plugin_page.html" if page.startswith("pages/") else f"{page}.html",
            {"page": page, "title": title, "pages": nav, "read_only": read_only, "can_train": can_train,
             "refresh_ms": int(refresh_s * 1000), **(context or {})},
        )

    @app.get("/pages/{path}", response_class=HTMLResponse)
    async def plugin_page(request: Request, path: str) -> HTMLResponse:
        found = extra.get(path)
        if found is None or settings is None:
            raise HTTPException(404, f"no plugin page {path!r}; pages: {', '.join(sorted(extra)) or 'none'}")
        try:
            columns, rows = await asyncio.to_thread(found.rows, settings)
        except Exception as exc:  # a plugin may raise anything; the dashboard says so and goes on
            raise HTTPException(500, f"the page {path!r} could not read its rows: {type(exc).__name__}: {exc}") from exc
        return render(request, f"pages/{path}", {"columns": list(columns), "rows": [list(r) for r in rows],
                                                 "description": found.description})

    @app.get("/", response_class=HTMLResponse)
    async def overview(request: Request) -> HTMLResponse:
        return render(request, "overview")

    @app.get("/{page}", response_class=HTMLResponse)
    async def page(request: Request, page: str) -> HTMLResponse:
        if page not in dict(PAGES) or page == "overview":
            raise HTTPException(404, f"no page {page!r}; pages: {', '.join(p for p, _ in PAGES)}")
        return render(request, page)

    @app.get("/api/stream", response_class=EventSourceResponse)
    async def stream(request: Request) -> AsyncIterator[ServerSentEvent]:
        last, quiet = -1, 0.0
        while not stop.is_set() and not await request.is_disconnected():
            position = await asyncio.to_thread(data.position)
            if position != last:
                last, quiet = position, 0.0
                yield ServerSentEvent(data={"position": position}, event="position", retry=2000)
            elif quiet >= KEEPALIVE_S:
                quiet = 0.0
                yield ServerSentEvent(comment="keep-alive")
            try:
                await asyncio.wait_for(stop.wait(), refresh_s)
            except TimeoutError:
                quiet += refresh_s

    @app.get("/api/{page}")
    async def page_data(page: str) -> dict[str, Any]:
        try:
            return await asyncio.to_thread(data.page, page)
        except KeyError:
            raise HTTPException(404, f"no page {page!r}; pages: {', '.join(p for p, _ in PAGES)}") from None

    if can_train:
        assert request_training is not None

        @app.post("/api/train/{role}")
        async def train(role: str, request: Request) -> dict[str, str]:
            from flywheel_loop.schemas.events import TrainingRequested

            if request.headers.get(ACTION_HEADER) != "1":
                # a page on another site can POST here too, but cannot add a header without a CORS
                # preflight, which this app never grants: only the dashboard's own pages can act
                detail = f"actions need the header {ACTION_HEADER}: 1 (cross-site requests are refused)"
                raise HTTPException(403, detail)
            try:
                TrainingRequested(role=role, reason="manual", log_position=0)
            except ValueError:
                raise HTTPException(422, f"{role!r} is not a role (lowercase letters, digits, - and _)") from None
            return {"role": role, "event_id": await request_training(role)}

    return app
