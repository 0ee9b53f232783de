"""Every hook a Flywheel plugin can implement, in one place.

A plugin is a module or object with functions marked ``@hookimpl`` whose names match the
specifications below. Built-in plugins (the feature packages under ``plugins/``) and
third-party packages are found the same way: through the entry-point group ``flywheel``.
The engine calls hooks only through the typed facade ``PluginHost``
(``flywheel_loop.engine.plugin_host``), and refuses at load time a plugin that implements a
hook that is not specified here (a misspelt name would otherwise be silently ignored).

The engine owns the I/O (consuming, validating, publishing, acking, state, positions);
plugins hand it what they do by registering it:

- settings sections, validated when the plugins load;
- **processors**: a processor turns one input event into zero or more new events (a policy);
- **projections**: a projection folds events into a local read model;
- **services**: long-running servers ``flywheel up`` runs beside them (the dashboard, the gateway);
- **commands**: ``flywheel`` subcommands;
- assessors, runtimes, rebuilders and dashboard pages, which other features look up by name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import typer

    from flywheel_loop.engine.assessment import Assessor
    from flywheel_loop.engine.config import PluginSection, Settings
    from flywheel_loop.engine.extensions import DashboardPage, Rebuilder, RuntimeFactory
    from flywheel_loop.engine.processor import Processor
    from flywheel_loop.engine.projection import Projection
    from flywheel_loop.engine.services import Service

PROJECT = "flywheel"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_settings(register: Callable[[type[PluginSection]], None]) -> None:
    """Register the plugin's settings sections.

    Called once when the plugin host loads the plugins, before anything else. Call
    ``register(MySection)`` for each ``PluginSection`` subclass; its ``section_name`` is the
    table in ``flywheel.toml`` (and ``FLYWHEEL_<SECTION>__<KEY>`` in the environment). The host
    then validates every section of the configuration against its model: a bad value stops the
    engine with a line naming the key, the value, the rule and the plugin; a section that no
    installed plugin registered is an error naming the installed plugins' sections. Read a
    section with ``MySection.of(settings)``.
    """


@hookspec
def configure(settings: Settings) -> None:
    """Called once with the loaded ``settings`` (every section validated) before anything is registered."""


@hookspec
def register_processors(register: Callable[[Processor], None], settings: Settings) -> None:
    """Register event processors.

    Called once when the engine starts, with the ``settings``. Call ``register(Processor(...))``
    for each step the plugin performs. Each processor gets its own durable JetStream consumer
    named after it, so running more engine processes scales it out. The processor's ``handle``
    receives one validated event and a ``ProcessContext`` (settings, its folded state with
    ``stateful=True``, ``read_log``, ``emit`` for live events) and returns the payloads of the
    events it produces (declared in ``produces``); the engine derives their ids from (input id,
    processor name, index), publishes them, and acks the input only once they are stored (once,
    also for an input redelivered after the duplicate window). Personal text is plain in what
    ``handle`` receives and returns: the engine opens and seals it (``engine/sealing.py``), and
    never calls ``handle`` with an event whose data subject was forgotten.
    """


@hookspec
def register_projections(register: Callable[[Projection], None], settings: Settings) -> None:
    """Register read models folded from the log.

    Called once when the engine starts (and by ``flywheel replay``, ``status`` and the commands
    that read projections), with the ``settings``. Call ``register(MyProjection())`` for each
    read model (``name``, ``consumes``, ``tables``, ``apply``). Each projection is applied in stream order
    and stores the last sequence it applied in the same SQLite transaction as its state, so it
    resumes exactly after a crash and can be rebuilt from the log at any time. ``apply`` receives
    plain payloads; an event whose data subject was forgotten comes with its personal fields blank
    and ``event.forgotten`` set.
    """


@hookspec
def register_services(register: Callable[[Service], None], settings: Settings) -> None:
    """Register long-running services (an HTTP server, a watcher).

    Called once by ``flywheel up`` after the processors and projections are prepared, with the
    ``settings``. Call ``register(Service(name, start))``; ``start(ctx)`` receives a
    ``ServiceContext`` (settings, the engine's bus, the plugin host, a logger) and returns a
    running service (``url`` to print, ``stop()``) or None when the service is switched off.
    ``plugins.skip`` names services not to start.
    """


@hookspec
def register_commands(cli: typer.Typer) -> None:
    """Add ``flywheel`` subcommands.

    Called once when the command line starts, with ``cli``, the root ``typer.Typer``. Add commands
    with ``@cli.command()`` or groups with ``cli.add_typer(...)``; ``flywheel_loop.engine.commands``
    has what a command needs (the settings with every plugin section validated, the bus, clear
    errors, projections caught up).
    Import heavy libraries inside the command, not at module level: ``flywheel --help`` loads
    every plugin.
    """


@hookspec
def register_assessors(register: Callable[[Assessor], None], settings: Settings) -> None:
    """Register assessors: functions that score one anonymized interaction.

    Called once when a scoring processor starts, with the ``settings``. Call
    ``register(Assessor(name, assess, version))``; ``assess(evidence)`` receives the
    ``Evidence`` known about one interaction (the interaction, and the feedback and outcomes
    that have arrived so far, late and in any order) and returns an ``Assessment`` with a score
    in [0, 1] for each dimension it had evidence for (leave one out rather than guess), or None
    when the interaction is none of its business. Be pure and quick: the same evidence must give
    the same assessment, and a call has a budget (``assessment.budget_ms``, 5 ms); an assessor
    that raises or overruns is recorded as a fallback, and repeated failures open its circuit
    breaker. ``assessment.assessor_weights`` and ``dimension_weights`` say how much it counts.
    """


@hookspec
def register_runtimes(register: Callable[[RuntimeFactory], None], settings: Settings) -> None:
    """Register model runtimes a deployer can put a version in service on.

    Called when a deployer's worker starts, with the ``settings``. Call
    ``register(RuntimeFactory(name, make))``; ``make(settings)`` builds a ``Runtime``
    (``flywheel_loop.engine.extensions``: prepare, serve, generate, stop). The deployer picks
    the runtime whose name ``deployer.runtime`` gives.
    """


@hookspec
def register_rebuilders(register: Callable[[Rebuilder], None]) -> None:
    """Register artifacts that can be rebuilt from the log alone.

    Called by ``flywheel replay`` when asked to rebuild an artifact. Call
    ``register(Rebuilder(kind, rebuild))``; ``rebuild(settings, bus, key, until)`` rebuilds the
    artifact ``key`` (a role's dataset, ...) as of log position ``until`` and returns its hash
    and folder, byte for byte what was built live.
    """


@hookspec
def register_dashboard_pages(register: Callable[[DashboardPage], None]) -> None:
    """Add pages to the web dashboard.

    Called once when the dashboard starts. Call ``register(DashboardPage(path, title, rows))``;
    ``rows(settings)`` returns the column names and rows of a table the page shows, read from
    the plugin's own projections. Pages appear in the dashboard's navigation.
    """


@hookspec
def synthesize_rehearsal(
    role: str, examples: list[dict[str, Any]], wanted: int, settings: Settings
) -> list[dict[str, Any]] | None:
    """Add synthetic rehearsal rows (e.g. self-synthesized rehearsal with the base model).

    Called by the dataset builder while it builds a dataset for ``role``, after it picked the
    real rehearsal rows, whenever the past examples could not fill the configured rehearsal
    share (``wanted`` > 0 rows are missing; on a role's first dataset that is all of them), with
    the ``settings``. ``examples`` are the new training rows (``prompt``, ``completion``,
    ``messages``, ``domain``, ``complexity``). Return rows of the form ``{"prompt": str,
    "completion": str}`` (optionally ``"domain"`` and ``"complexity"``), or None. The builder
    takes the first ``wanted`` rows of all plugins' answers, formats them with the base model's
    chat template and tags them ``rehearsal`` and ``synthetic``. Be deterministic for the same
    input: a replay must rebuild the same dataset byte for byte.
    """


@hookspec
def find_sensitive(text: str) -> list[str] | None:
    """Say which kinds of secrets or personal data ``text`` holds (never the values).

    Called by features that must not let such data out, e.g. the evaluator's canary check on
    what a candidate model says. Return the kinds found (``["EMAIL", "AWS_ACCESS_KEY"]``), an
    empty list for none, or None when the plugin does not scan text.
    """
