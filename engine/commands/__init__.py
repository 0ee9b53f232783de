"""Command-line commands that live beside their domain (training runs, deployments, data
deletion...). Each module defines ``register(app, settings, run)``: ``app`` is the root typer
app, ``settings()`` loads the configuration (exiting with a clear error), ``run(coro_fn)`` runs
a coroutine and turns a bus or configuration error into one clear line. ``engine/cli.py``
lists the modules in ``COMMAND_MODULES``."""
