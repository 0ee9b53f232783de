"""The web dashboard: the flywheel at a glance, served by ``flywheel up`` and ``flywheel dashboard``.

``queries`` reads the ``dashboard`` projection (``plugins/dashboard_view.py``) read-only, ``app``
is the FastAPI application (pages, JSON, a Server-Sent Events stream of the log position), and
``server`` runs it with uvicorn inside the engine's asyncio loop. Importing this package imports
none of them, so the projection plugin can share the projection's name without the web stack.
"""
