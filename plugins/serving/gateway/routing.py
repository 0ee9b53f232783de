"""Which upstream answers a request: a role's name, a pinned version, or a configured upstream.

``ServiceTable`` folds the deployment events of the log (``deployment.completed``, ``deployment.rolled_back``) in
order, as ``plugins/deployments.py`` does, into what matters for routing: per role, the version in service, its
traffic share and the version sharing the rest; per version, the endpoint it was last served at. The gateway
folds them from a live ordered consumer, so a deployment, a canary promotion or a rollback takes effect on the
next request; a request in flight keeps the upstream it was given.

``Router.resolve`` turns the model name of a request into a ``Target``:

- a role (``coder``): the version in service; while a canary runs, the session's hash puts it on the canary (the
  configured share of sessions) or on the version before it, the same side every time;
- a version name (``coder-771f6577861a``) that is being served: that version (pinning);
- an upstream name from ``[gateway.upstreams]``: that server, by URL;
- a role's base model (``coder-base``) or a role with nothing deployed: the role's ``base`` upstream.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from flywheel_loop.plugins.serving.gateway.settings import GatewayConfig
from flywheel_loop.plugins.shared.deployment_book import base_name, version_name
from flywheel_loop.schemas import DeploymentCompleted, DeploymentRolledBack, Event

__all__ = ["NoUpstream", "RoleService", "Router", "ServiceTable", "Target", "UnknownModel", "session_bucket"]


class UnknownModel(LookupError):
    """The requested model is no role, served version or upstream this gateway knows (404)."""


class NoUpstream(LookupError):
    """The model is known but nothing can answer for it now (503)."""


@dataclass(frozen=True)
class Target:
    """Where one request goes, and what is recorded about it."""

    served_version: str
    role: str
    base_url: str
    upstream_model: str
    requested: str
    api_key: str | None = None
    canary: bool = False


@dataclass(frozen=True)
class RoleService:
    model_name: str
    share: float
    sharing_with: str | None


def session_bucket(role: str, session: str) -> float:
    """A number in [0, 1) fixed by (role, session): the session's side of a traffic split."""
    digest = hashlib.blake2b(f"{role}\x1f{session}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


class ServiceTable:
    """What is in service per role, folded from the deployment events in log order."""

    def __init__(self) -> None:
        self.services: dict[str, RoleService] = {}
        #: version name -> the endpoint (``.../v1``) it was last served at
        self.endpoints: dict[str, str] = {}
        self.roles_of: dict[str, str] = {}
        #: the last log sequence folded
        self.position = 0

    def apply(self, event: Event[Any], seq: int) -> None:
        data = event.data
        if isinstance(data, DeploymentCompleted):
            self._note(data.role, data.model_name, data.endpoint)
            sharing = data.previous_model_name if data.traffic_share < 1.0 else None
            self.services[data.role] = RoleService(data.model_name, data.traffic_share, sharing)
        elif isinstance(data, DeploymentRolledBack):
            target = data.to_model_name or version_name(data.role, data.to_adapter)
            self._note(data.role, target, data.endpoint)
            self.services[data.role] = RoleService(target, 1.0, None)
        self.position = max(self.position, seq)

    def _note(self, role: str, name: str, endpoint: str | None) -> None:
        self.roles_of[name] = role
        if endpoint:
            self.endpoints[name] = endpoint.rstrip("/")

    def served(self) -> dict[str, str]:
        """Version name -> endpoint, for the versions that take traffic now."""
        out: dict[str, str] = {}
        for service in self.services.values():
            for name in (service.model_name, service.sharing_with):
                if name is not None and name in self.endpoints:
                    out[name] = self.endpoints[name]
        return out


class Router:
    """Resolves a request's model name against the service table and the configured upstreams."""

    def __init__(self, cfg: GatewayConfig, table: ServiceTable) -> None:
        self.cfg = cfg
        self.table = table

    def roles(self) -> list[str]:
        return sorted({*self.table.services, *self.cfg.roles})

    def resolve(self, model: str, session: str) -> Target:
        """The target for ``model`` in ``session``; ``UnknownModel`` or ``NoUpstream`` otherwise."""
        if model in self.table.services or model in self.cfg.roles:
            return self._role(model, session)
        served = self.table.served()
        if model in served:
            return Target(model, self.table.roles_of[model], served[model], model, model)
        upstream = self.cfg.upstreams.get(model)
        if upstream is not None:
            key = upstream.api_key.get_secret_value() if upstream.api_key else None
            role = upstream.role or self.cfg.default_role
            return Target(model, role, upstream.url, upstream.model or model, model, key)
        for role in self.roles():
            if model == base_name(role):
                return self._base(role, model)
        if model in self.table.roles_of:
            role = self.table.roles_of[model]
            in_service = ", ".join(sorted(served)) or "none"
            raise NoUpstream(f"version {model!r} of role {role!r} is not being served now (served: {in_service});"
                             f" ask for {role!r} to get the version in service")
        raise UnknownModel(f"model {model!r} is not served here; ask for a role ({', '.join(self.roles()) or 'none'}),"
                           f" a version in service ({', '.join(sorted(served)) or 'none'}) or an upstream"
                           f" ({', '.join(sorted(self.cfg.upstreams)) or 'none'})")

    def _role(self, role: str, session: str) -> Target:
        service = self.table.services.get(role)
        if service is None:
            return self._base(role, role)
        name, canary = service.model_name, False
        if service.sharing_with is not None and service.share < 1.0:
            canary = session_bucket(role, session) < service.share
            if not canary:
                name = service.sharing_with
        endpoint = self.table.endpoints.get(name)
        if endpoint is not None:
            return Target(name, role, endpoint, name, role, canary=canary)
        if name == base_name(role):
            base = self._base(role, role)
            return Target(name, role, base.base_url, base.upstream_model, role, base.api_key, canary)
        raise NoUpstream(f"{name} is in service for role {role!r} but no endpoint was announced for it")

    def _base(self, role: str, requested: str) -> Target:
        spec = self.cfg.roles.get(role)
        base = spec.base if spec is not None else None
        upstream = self.cfg.upstreams.get(base) if base else None
        if upstream is None or base is None:
            raise NoUpstream(f"nothing is in service for role {role!r} yet and gateway.roles.{role}.base names no"
                             " upstream for its base model")
        key = upstream.api_key.get_secret_value() if upstream.api_key else None
        return Target(base_name(role), role, upstream.url, upstream.model or base, requested, key)

    def models(self) -> list[str]:
        """Every name a request may ask for now."""
        return sorted({*self.roles(), *self.table.served(), *self.cfg.upstreams})
