"""The gateway's settings section, ``[gateway]`` in ``flywheel.toml``.

The models live in ``engine/config.py`` for now (the engine may not import a plugin, and plugins cannot yet
register their own section); they move here once the ``register_settings`` hook exists. Import them from here so
that move changes nothing for this package.
"""

from __future__ import annotations

from engine.config import GatewayConfig, GatewayKey, GatewayRole, GatewayUpstream, SessionSource

__all__ = ["GatewayConfig", "GatewayKey", "GatewayRole", "GatewayUpstream", "SessionSource"]
