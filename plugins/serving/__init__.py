"""Serving: a version reaches service only through the gate, and goes back on drift.

- processor ``deployer``: a passed ``evaluation.completed`` is deployed on the configured runtime
  (prepare, serve, smoke test, then ``deployment.completed`` with the traffic share); a refused
  one gets ``deployment.failed``; ``drift.detected`` and ``rollback.requested`` put the previous
  version back (``deployment.rolled_back``); ``canary.passed`` promotes a canary;
- processor ``drift_monitor``: ``drift.detected`` when the version in service earns less reward
  than the one before it (Mann-Whitney U), ``canary.passed`` when a canary holds up;
- projection ``deployments``: what is in service per role;
- service ``gateway``: the OpenAI- and Anthropic-compatible endpoint agents call; it serves a role's name from the
  version in service, splits canary traffic by session and records every call (``gateway/``);
- runtimes ``transformers``, ``llama_cpp``, ``ollama`` (``register_runtimes``);
- commands ``flywheel deployments``, ``flywheel rollback``, ``flywheel gateway``;
- settings ``[deployer]``, ``[drift]``, ``[ollama]``, ``[llama_cpp]``, ``[bandit]``, ``[gateway]``.
"""

from __future__ import annotations

from collections.abc import Callable

import typer

from flywheel_loop.engine.config import PluginSection, Settings
from flywheel_loop.engine.extensions import RuntimeFactory
from flywheel_loop.engine.hookspecs import hookimpl
from flywheel_loop.engine.processor import Processor
from flywheel_loop.engine.projection import Projection
from flywheel_loop.engine.services import Service
from flywheel_loop.plugins.serving.gateway.settings import GatewayConfig
from flywheel_loop.plugins.serving.settings import (
    BanditSection,
    DeployerConfig,
    DriftConfig,
    LlamaCppConfig,
    OllamaConfig,
)


@hookimpl
def register_settings(register: Callable[[type[PluginSection]], None]) -> None:
    for section in (DeployerConfig, DriftConfig, OllamaConfig, LlamaCppConfig, BanditSection, GatewayConfig):
        register(section)


@hookimpl
def register_processors(register: Callable[[Processor], None], settings: Settings) -> None:
    from flywheel_loop.plugins.serving import deployer, drift

    register(deployer.processor(settings))
    register(drift.processor(settings))


@hookimpl
def register_projections(register: Callable[[Projection], None], settings: Settings) -> None:
    from flywheel_loop.plugins.serving.deployments import Deployments

    register(Deployments())


@hookimpl
def register_runtimes(register: Callable[[RuntimeFactory], None], settings: Settings) -> None:
    from flywheel_loop.plugins.serving.runtimes import RUNTIMES

    for runtime in RUNTIMES:
        register(runtime)


@hookimpl
def register_services(register: Callable[[Service], None], settings: Settings) -> None:
    from flywheel_loop.plugins.serving.gateway.service import gateway_service

    register(Service("gateway", gateway_service, "the OpenAI- and Anthropic-compatible gateway agents call"))


@hookimpl
def register_commands(cli: typer.Typer) -> None:
    from flywheel_loop.plugins.serving import commands
    from flywheel_loop.plugins.serving.gateway import commands as gateway_commands

    commands.register(cli)
    gateway_commands.register(cli)
