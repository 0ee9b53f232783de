"""The plugin host: one pluggy manager, a typed facade over the hooks.

Plugins are found through the entry-point group ``flywheel`` (the built-ins in
``plugins/`` are declared there too, in pyproject.toml), filtered by
``plugins.enabled`` / ``plugins.disabled``. Nothing here knows a plugin by name.
"""

from __future__ import annotations

import importlib.metadata
import logging
from typing import Any

import pluggy

from engine import hookspecs
from engine.config import ConfigError, Settings
from engine.processor import Processor
from engine.projection import Projection

log = logging.getLogger(__name__)


class PluginError(RuntimeError):
    """A plugin could not be loaded or registered something invalid."""


def installed_plugins() -> dict[str, importlib.metadata.EntryPoint]:
    """Entry points of the ``flywheel`` group, by name."""
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=hookspecs.PROJECT)}


class PluginHost:
    """Loads the enabled plugins and collects what they register."""

    def __init__(self, settings: Settings, load_entry_points: bool = True) -> None:
        self.settings = settings
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        if load_entry_points:
            self._load_entry_points()

    def _load_entry_points(self) -> None:
        cfg = self.settings.plugins
        available = installed_plugins()
        wanted = set(available) if cfg.enabled is None else set(cfg.enabled)
        missing = sorted((wanted | set(cfg.disabled)) - set(available))
        if missing:
            raise ConfigError(
                f"plugins: {missing} not installed; installed plugins: {sorted(available)}"
            )
        for name in sorted(wanted - set(cfg.disabled)):
            try:
                plugin = available[name].load()
            except Exception as exc:
                raise PluginError(f"plugin {name!r} failed to load: {exc!r}") from exc
            self.pm.register(plugin, name=name)

    def register(self, plugin: Any, name: str | None = None) -> None:
        """Register a plugin object directly (tests, embedding applications)."""
        self.pm.register(plugin, name=name)

    def unregister(self, name: str) -> None:
        self.pm.unregister(name=name)

    @property
    def names(self) -> list[str]:
        return sorted(n for n, _ in self.pm.list_name_plugin())

    def configure(self) -> None:
        self.pm.hook.configure(settings=self.settings)

    def processors(self) -> list[Processor]:
        found: list[Processor] = []
        self.pm.hook.register_processors(register=found.append, settings=self.settings)
        return self._unique(found, Processor, "processor")

    def projections(self) -> list[Projection]:
        found: list[Projection] = []
        self.pm.hook.register_projections(register=found.append, settings=self.settings)
        return self._unique(found, Projection, "projection")

    @staticmethod
    def _unique(items: list[Any], kind: type[Any], label: str) -> list[Any]:
        seen: dict[str, Any] = {}
        item: Any
        for item in items:
            if not isinstance(item, kind):
                raise PluginError(f"a plugin registered {item!r}, which is not a {kind.__name__}")
            if not item.name:
                raise PluginError(f"a plugin registered a {label} without a name")
            if item.name in seen:
                raise PluginError(f"two plugins registered a {label} named {item.name!r}")
            seen[item.name] = item
        return list(seen.values())
