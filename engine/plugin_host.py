"""The plugin host: one pluggy manager and a typed facade over every hook.

Plugins are found through the entry-point group ``flywheel`` (the built-in feature packages
are declared there too, in pyproject.toml), filtered by ``plugins.enabled`` /
``plugins.disabled``. Nothing here knows a plugin by name. The rest of the engine and the
plugins call hooks only through this class (``host.processors()``, ``host.assessors()``, ...),
never ``pm.hook.<name>(...)`` by string, and the host checks at load time that every hook a
plugin implements is specified (``check_pending``): a misspelt hook is an error, not silence.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

import pluggy

from flywheel_loop.engine import hookspecs
from flywheel_loop.engine.assessment import Assessor
from flywheel_loop.engine.config import ConfigError, PluginSection, Settings, validate_sections
from flywheel_loop.engine.extensions import DashboardPage, Rebuilder, RuntimeFactory
from flywheel_loop.engine.processor import Processor
from flywheel_loop.engine.projection import Projection
from flywheel_loop.engine.services import Service

if TYPE_CHECKING:
    import typer

log = logging.getLogger(__name__)

T = TypeVar("T")


class PluginError(RuntimeError):
    """A plugin could not be loaded or registered something invalid."""


def installed_plugins() -> dict[str, importlib.metadata.EntryPoint]:
    """Entry points of the ``flywheel`` group, by name."""
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=hookspecs.PROJECT)}


def _sections_of(entry_point: importlib.metadata.EntryPoint) -> set[str]:
    """The section names a plugin that is switched off would register (so its leftover
    configuration is not mistaken for a typo); nothing when it cannot even be loaded."""
    found: list[Any] = []
    try:
        register = getattr(entry_point.load(), "register_settings", None)
        if callable(register):
            register(found.append)
    except Exception:
        return set()
    return {str(getattr(model, "section_name", "")) for model in found} - {""}


class PluginHost:
    """Loads the enabled plugins, validates their settings, and collects what they register."""

    def __init__(self, settings: Settings, load_entry_points: bool = True) -> None:
        self.settings = settings
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self._sections: dict[str, tuple[str, type[PluginSection]]] = {}
        #: sections of installed plugins that are switched off: allowed in the configuration, not validated
        self._dormant: set[str] = set()
        if load_entry_points:
            self._load_entry_points()
            self._check()
            validate_sections(settings, self._sections, self._dormant)

    def _load_entry_points(self) -> None:
        cfg = self.settings.plugins
        available = installed_plugins()
        wanted = set(available) if cfg.enabled is None else set(cfg.enabled)
        missing = sorted((wanted | set(cfg.disabled)) - set(available))
        if missing:
            raise ConfigError(f"plugins: {missing} not installed; installed plugins: {sorted(available)}")
        for name in sorted(wanted - set(cfg.disabled)):
            try:
                plugin = available[name].load()
            except Exception as exc:
                raise PluginError(f"plugin {name!r} failed to load: {exc!r}") from exc
            self.pm.register(plugin, name=name)
        for name in sorted(set(available) - (wanted - set(cfg.disabled))):
            self._dormant |= _sections_of(available[name])



    def register(self, plugin: Any, name: str | None = None) -> None:
        """Register a plugin object directly (tests, embedding applications); its hooks are
        checked and its settings sections validated at once."""
        self.pm.register(plugin, name=name)
        known = set(self._sections)
        self._check()
        added = {k: v for k, v in self._sections.items() if k not in known}
        for _, model in added.values():
            self.settings.section(model)

    def unregister(self, name: str) -> None:
        self.pm.unregister(name=name)

    @property
    def names(self) -> list[str]:
        return sorted(n for n, _ in self.pm.list_name_plugin())

    # ------------------------------------------------------------------ checks

    def _check(self) -> None:
        """Every hook implemented is specified; sections are registered once, by one plugin."""
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise PluginError(
                f"plugin {exc.plugin!r} implements a hook that does not exist ({exc}); the hooks are in"
                " flywheel_loop/engine/hookspecs.py"
            ) from None
        sections: dict[str, tuple[str, type[PluginSection]]] = {}
        for plugin, model in self._collect("register_settings"):
            if not (isinstance(model, type) and issubclass(model, PluginSection)):
                raise PluginError(f"plugin {plugin!r} registered {model!r} as settings, which is not a PluginSection")
            name = getattr(model, "section_name", "")
            if not name or not name.isidentifier():
                raise PluginError(f"plugin {plugin!r}: settings {model.__name__} need a section_name")
            if name in Settings.model_fields:
                raise PluginError(f"plugin {plugin!r}: [{name}] is one of the engine's own settings")
            if name in sections and sections[name][1] is not model:
                raise PluginError(f"plugins {sections[name][0]!r} and {plugin!r} both register the section [{name}]")
            sections[name] = (plugin, model)
        self._sections = sections

    def sections(self) -> dict[str, tuple[str, type[PluginSection]]]:
        """Section name -> (plugin, model) for every registered settings section."""
        return dict(self._sections)

    # ------------------------------------------------------------------ calling

    def _collect(self, hook: str, **kwargs: Any) -> list[tuple[str, Any]]:
        """Call each implementation of a ``register_*`` hook with a ``register`` callback, and
        return (plugin name, registered item) in plugin-name order."""
        found: list[tuple[str, Any]] = []
        caller: pluggy.HookCaller = getattr(self.pm.hook, hook)
        for impl in sorted(caller.get_hookimpls(), key=lambda i: i.plugin_name):
            args = {"register": lambda item, plugin=impl.plugin_name: found.append((plugin, item)), **kwargs}
            try:
                impl.function(*[args[a] for a in impl.argnames])
            except (PluginError, ConfigError):
                raise
            except Exception as exc:
                raise PluginError(f"plugin {impl.plugin_name!r} failed in {hook}: {exc!r}") from exc
        return found

    def _named(self, hook: str, kind: type[T], label: str, key: Callable[[T], str], **kwargs: Any) -> list[T]:
        seen: dict[str, tuple[str, T]] = {}
        for plugin, item in self._collect(hook, **kwargs):
            if not isinstance(item, kind):
                raise PluginError(f"plugin {plugin!r} registered {item!r}, which is not a {kind.__name__}")
            name = key(item)
            if not name:
                raise PluginError(f"plugin {plugin!r} registered a {label} without a name")
            if name in seen:
                raise PluginError(f"plugins {seen[name][0]!r} and {plugin!r} both registered a {label} named {name!r}")
            seen[name] = (plugin, item)
        return [item for _, item in seen.values()]

    def inventory(self) -> dict[str, dict[str, list[str]]]:
        """plugin -> what it registers (settings sections, processors, projections, services,
        assessors, runtimes, commands), by name."""
        found: dict[str, dict[str, list[str]]] = {name: {} for name in self.names}
        for section, (plugin, _) in sorted(self._sections.items()):
            found.setdefault(plugin, {}).setdefault("settings", []).append(f"[{section}]")
        for kind, hook in (("processors", "register_processors"), ("projections", "register_projections"),
                           ("services", "register_services"), ("assessors", "register_assessors"),
                           ("runtimes", "register_runtimes")):
            for plugin, item in self._collect(hook, settings=self.settings):
                found.setdefault(plugin, {}).setdefault(kind, []).append(str(getattr(item, "name", item)))
        import typer

        for impl in sorted(self.pm.hook.register_commands.get_hookimpls(), key=lambda i: i.plugin_name):
            cli = typer.Typer()
            impl.function(cli=cli)
            names = [c.name or (c.callback.__name__ if c.callback else "?") for c in cli.registered_commands]
            names += [g.name or "?" for g in cli.registered_groups]
            found.setdefault(impl.plugin_name, {})["commands"] = sorted(names)
        return found

    def configure(self) -> None:
        self.pm.hook.configure(settings=self.settings)

    def processors(self) -> list[Processor]:
        return self._named("register_processors", Processor, "processor", lambda p: p.name, settings=self.settings)

    def projections(self) -> list[Projection]:
        return self._named("register_projections", Projection, "projection", lambda p: p.name,
                           settings=self.settings)

    def services(self) -> list[Service]:
        return self._named("register_services", Service, "service", lambda s: s.name, settings=self.settings)

    def assessors(self) -> list[Assessor]:
        return self._named("register_assessors", Assessor, "assessor", lambda a: a.name, settings=self.settings)

    def runtimes(self) -> dict[str, RuntimeFactory]:
        found = self._named("register_runtimes", RuntimeFactory, "runtime", lambda r: r.name, settings=self.settings)
        return {r.name: r for r in found}

    def rebuilders(self) -> dict[str, Rebuilder]:
        return {r.kind: r for r in self._named("register_rebuilders", Rebuilder, "rebuilder", lambda r: r.kind)}

    def dashboard_pages(self) -> list[DashboardPage]:
        return self._named("register_dashboard_pages", DashboardPage, "dashboard page", lambda p: p.path)

    def add_commands(self, cli: typer.Typer) -> None:
        """Let every plugin add its commands to ``cli``."""
        for impl in sorted(self.pm.hook.register_commands.get_hookimpls(), key=lambda i: i.plugin_name):
            try:
                impl.function(cli=cli)
            except Exception as exc:
                raise PluginError(f"plugin {impl.plugin_name!r} failed in register_commands: {exc!r}") from exc

    def synthesize_rehearsal(self, role: str, examples: list[dict[str, Any]], wanted: int) -> list[dict[str, Any]]:
        """Every plugin's synthetic rehearsal rows, in plugin order."""
        answers: Iterable[list[dict[str, Any]] | None] = self.pm.hook.synthesize_rehearsal(
            role=role, examples=examples, wanted=wanted, settings=self.settings
        )
        return [row for answer in answers if answer for row in answer]

    def find_sensitive(self, text: str) -> list[str] | None:
        """The kinds of sensitive data the plugins find in ``text``, one entry per finding (the
        first plugin that scans text answers); None when no plugin scans text."""
        for impl in reversed(self.pm.hook.find_sensitive.get_hookimpls()):
            found = impl.function(text=text)
            if isinstance(found, Iterable):
                return [str(kind) for kind in found]
        return None
