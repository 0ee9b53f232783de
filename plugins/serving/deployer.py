"""Built-in processor ``deployer``: puts a version in service only through the gate, and rolls it back.

It consumes:

- ``evaluation.completed``: a passed evaluation deploys its adapter (fetched from the bus and verified when this
  machine does not have it); a failed one (or one that names no adapter, or an adapter that can be had neither
  here nor on the bus) is refused with ``deployment.failed`` and the reason, and nothing
  changes in service. An ``inconclusive`` one (the gate could not tell) follows ``deployer.on_inconclusive``:
  ``canary`` (the default) deploys it at ``deployer.inconclusive_share`` of the traffic beside the version in
  service (before the role's first deployment: beside its base model, which the gateway serves from
  ``gateway.roles.<role>.base``), and production reward decides (``canary.passed`` promotes it,
  ``drift.detected`` rolls it back); with ``refuse`` it is refused. The only ways into service are a passed
  evaluation on the log, or an inconclusive one as a canary.
- ``canary.passed`` (from the drift monitor): a canary that earned as much as the version before it takes all the
  traffic (a new ``deployment.completed`` for the same version, share 1.0) and the previous version stops.
- ``drift.detected``: the drifted version, if it is still in service, is replaced by the one before it.
- ``rollback.requested`` (``flywheel rollback --role ROLE``): the same, by hand.
- ``dataset.superseded`` (a dataset rebuilt without forgotten data): every adapter trained on the old dataset
  (``training.completed`` on the log) gets an ``adapter.superseded`` saying what is done about it, and is never a
  rollback target again. One that is not in service is withdrawn. One in service is, by
  ``deployer.on_forgotten``, rolled back at once to the newest version not trained on forgotten data (or the base
  model; ``deployment.rolled_back`` with trigger ``forgotten``), or left in service while the trainer trains the
  replacement dataset (``retrain``; the new adapter passes the gate like any other, and a rollback when there is
  no replacement to train). A withdrawn version that only served the rest of a canary's traffic stops, and the
  canary takes all of it.

A deployment: the runtime (``deployer.runtime``: ``transformers``, the default that always works; ``llama_cpp``;
``ollama``) prepares the version (load, convert, upload: no traffic yet), serves it, and answers a smoke test
(one short greedy generation of ``deployer.smoke_prompt``); only then does ``deployment.completed`` move
``deployer.canary_share`` of the role's traffic to it (default 1.0: all of it; below 1 the previous version keeps
serving the rest, and the event names it, so the bandits and the drift monitor can compare the two, until the
canary passes or drifts). A smoke
test that fails stops what was started and ends in ``deployment.failed``. The ``deployer.keep_versions`` newest
versions are kept for rollback (listed in the event); a runtime that stores models (Ollama) deletes older ones.

A rollback serves the previous version (again), smoke-tests it, stops the one it replaces and publishes
``deployment.rolled_back``; the version before a role's first deployment is its base model.

**State and redelivery.** The deployer's state is the deployment book (``plugins/shared/deployment_book.py``),
folded from the log's deployment events (its own decisions included) on every deployer process; it handles one
input at a time on a book caught up to the end of the log, and an input whose outputs are on the log is not
handled again: a redelivered input deploys nothing twice.

**Servers and the engine's life.** What a deployer serves lives as long as the engine: the transformers
runtime serves from the engine's process, llama.cpp servers are child processes stopped when the engine stops
(the processor's ``on_stop``, and ``atexit`` for a process that ends otherwise). When the engine starts, the
deployer serves again, in the background, what its book says is in service (on the port it had, when that port
is free). Ollama runs on its own and keeps its models. Runtimes are plugins: the deployer builds the one
``deployer.runtime`` names from those registered with ``register_runtimes``.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from flywheel_loop.engine.artifacts import ThreadArtifacts
from flywheel_loop.engine.config import Settings
from flywheel_loop.engine.extensions import Runtime, RuntimeUnavailable, ServedModel
from flywheel_loop.engine.plugin_host import PluginHost
from flywheel_loop.engine.processor import ProcessContext, Processor
from flywheel_loop.plugins.serving.settings import DeployerConfig
from flywheel_loop.plugins.shared.deployment_book import (
    BOOK_EVENTS,
    TABLES,
    DeploymentBook,
    base_name,
    version_name,
)
from flywheel_loop.plugins.shared.models import AdapterUnusable, BaseModelUnusable, adapter_folder, base_model_dir
from flywheel_loop.schemas import (
    AdapterSuperseded,
    CanaryPassed,
    DatasetSuperseded,
    DeploymentCompleted,
    DeploymentFailed,
    DeploymentRolledBack,
    DriftDetected,
    EvaluationCompleted,
    Event,
    Payload,
    RollbackRequested,
    TrainingCompleted,
    derived_event,
)

__all__ = ["NAME", "Deployer", "processor", "runtimes_of"]

log = logging.getLogger(__name__)

NAME = "deployer"
CONSUMES = ("evaluation.completed", "canary.passed", "drift.detected", "rollback.requested", "dataset.superseded")


RuntimeMaker = Callable[[str, Settings], Runtime]


def runtimes_of(plugins: PluginHost | None) -> RuntimeMaker:
    """Builds a runtime by name from those the plugins registered (``register_runtimes``)."""

    def make(name: str, settings: Settings) -> Runtime:
        known = plugins.runtimes() if plugins is not None else {}
        if name not in known:
            raise RuntimeUnavailable(
                f"unknown runtime {name!r}: deployer.runtime is one of {', '.join(sorted(known)) or 'none installed'}"
            )
        return known[name].make(settings)

    return make


class Refused(Exception):
    """A deployment or rollback that cannot happen; the message is the reason published."""


class Deployer:
    """The processor and the runtimes it started; one book per state folder."""

    def __init__(self, settings: Settings, runtime_factory: RuntimeMaker | None = None) -> None:
        self.settings = settings
        #: the bus's artifact store, for the worker threads (set when the worker starts)
        self.artifacts: ThreadArtifacts | None = None
        #: tests hand a factory in; the engine's plugin host provides the registered runtimes otherwise
        self.runtime_factory = runtime_factory
        self.runtimes: dict[str, Runtime] = {}
        self.lock = threading.RLock()  # one decision at a time, and never during a restore

    def runtime(self, name: str) -> Runtime:
        with self.lock:
            if name not in self.runtimes:
                if self.runtime_factory is None:
                    raise RuntimeUnavailable("the deployer has no runtimes yet: its worker has not started")
                self.runtimes[name] = self.runtime_factory(name, self.settings)
            return self.runtimes[name]

    def served_model(self, role: str, adapter_hash: str | None) -> ServedModel:
        """What to serve for ``role`` with ``adapter_hash`` (None: the base model alone)."""
        try:
            base = base_model_dir(self.settings, self.artifacts)
        except BaseModelUnusable as exc:
            raise Refused(f"the base model cannot be used: {exc}") from exc
        adapter_dir = None
        if adapter_hash is not None:
            try:
                adapter_dir = adapter_folder(self.settings, adapter_hash, self.artifacts)
            except AdapterUnusable as exc:
                raise Refused(f"adapter {adapter_hash[:12]} cannot be served: {exc}") from None
        return ServedModel(role, version_name(role, adapter_hash), base, adapter_dir, adapter_hash)

    # ------------------------------------------------------------------ the processor

    async def handle(self, event: Event[Any], ctx: ProcessContext) -> list[Payload]:
        trained: list[TrainingCompleted] = []
        if isinstance(event.data, DatasetSuperseded):  # which adapters were trained on it, up to this event
            trained = [e.data for _, e in await ctx.read_log(("training.completed",), ctx.sequence or None)]
        # Loading, converting and smoke-testing block: keep the worker's loop (and its heartbeat) free.
        return await asyncio.to_thread(self._handle, event, ctx, trained)

    def _handle(self, event: Event[Any], ctx: ProcessContext, trained: list[TrainingCompleted]) -> list[Payload]:
        with self.lock:
            book = DeploymentBook(ctx.state.db, create=False)  # folded from the log up to its end
            data = event.data
            if isinstance(data, EvaluationCompleted):
                outputs = self._deploy(book, event.id, data)
            elif isinstance(data, CanaryPassed):
                outputs = self._promote(book, data)
            elif isinstance(data, DriftDetected):
                outputs = self._drifted(book, data)
            elif isinstance(data, RollbackRequested):
                outputs = self._rollback(book, data.role, f"requested by {data.requested_by}: {data.reason}",
                                         "manual")
            elif isinstance(data, DatasetSuperseded):
                outputs = self._superseded(book, event, ctx.sequence, data, trained)
            else:
                outputs = []
        for out in outputs:
            ctx.log.info("%s: %s", out.event_type, out.model_dump(exclude_defaults=True))
        return outputs

    # ------------------------------------------------------------------ deploy

    def _deploy(self, book: DeploymentBook, evaluation_id: str, data: EvaluationCompleted) -> list[Payload]:
        runtime_name = DeployerConfig.of(self.settings).runtime
        role, digest = data.role, data.adapter_hash

        def failed(reason: str) -> list[Payload]:
            return [DeploymentFailed(
                role=role, runtime=runtime_name, adapter_hash=digest, reason=reason[:2000],
                model_name=version_name(role, digest) if digest else None, evaluation_id=evaluation_id,
            )]

        cfg = DeployerConfig.of(self.settings)
        outcome = data.outcome  # events written before the three-way gate have only ``passed``
        why = "; ".join(data.reasons) or "no reason given"
        current = book.service(role)
        share = cfg.canary_share
        if outcome == "inconclusive":
            if cfg.on_inconclusive == "refuse":
                return failed(f"refused: evaluation {evaluation_id} (run {data.run_id}) was inconclusive and"
                              f" deployer.on_inconclusive is 'refuse': {why}")
            share = min(cfg.inconclusive_share, cfg.canary_share)
        elif not data.passed:
            return failed(f"refused: evaluation {evaluation_id} (run {data.run_id}) did not pass the gate: {why}")
        if digest is None:
            return failed(f"refused: evaluation {evaluation_id} (run {data.run_id}) names no adapter to deploy")
        if outcome == "passed" and book.passed_evaluation(digest) is None:  # cannot happen after the fold above
            return failed(f"refused: adapter {digest[:12]} has no passed evaluation on the log")
        if current is not None and current.adapter_hash == digest:
            log.info("%s: %s is already in service", role, current.model_name)
            return []
        try:
            model = self.served_model(role, digest)
        except Refused as exc:
            return failed(str(exc))
        runtime = self.runtime(runtime_name)
        fresh = model.model_name not in {v.model_name for v in book.kept(role)}
        try:
            endpoint = self._serve_and_smoke(runtime, model, fresh=fresh)
        except RuntimeUnavailable as exc:
            return failed(str(exc))
        if outcome == "inconclusive":
            log.info("%s: %s deployed as a canary at %.0f%% of traffic: its evaluation was inconclusive", role,
                     model.model_name, 100 * share)
        if current is not None:
            # The version before the current one stops serving now (a canary of a canary leaves two at most);
            # the current one stops too unless it keeps the rest of the traffic.
            if current.sharing_with:
                self._stop(book, role, current.sharing_with, current.runtime)
            if share >= 1.0:
                self._stop(book, role, current.model_name, current.runtime)
        kept_before = [v.model_name for v in book.kept(role) if v.model_name != model.model_name]
        kept = [model.model_name, *kept_before][: cfg.keep_versions]
        for name in kept_before[cfg.keep_versions - 1:]:
            self._retire(book, role, name)
        # a canary before the role's first deployment shares the traffic with the base model, which the gateway
        # serves from the role's base upstream (gateway.roles.<role>.base)
        previous = current.model_name if current else base_name(role) if share < 1.0 else None
        return [DeploymentCompleted(
            role=role,
            runtime=runtime_name,
            model_name=model.model_name,
            adapter_hash=digest,
            evaluation_id=evaluation_id,
            traffic_share=share,
            endpoint=endpoint,
            previous_model_name=previous,
            previous_adapter_hash=current.adapter_hash if current else None,
            kept=kept,
        )]

    def _serve_and_smoke(self, runtime: Runtime, model: ServedModel, port: int | None = None,
                         fresh: bool = False) -> str:
        """Prepare, serve and smoke-test ``model``; on any failure stop what was started (and, for a ``fresh``
        version, delete what the runtime created for it) and raise."""
        cfg = DeployerConfig.of(self.settings)
        try:
            runtime.prepare(model)
            endpoint = _serve(runtime, model, port)
            runtime.generate(model, cfg.smoke_prompt, max_tokens=cfg.smoke_max_tokens, temperature=0.0)
        except Exception as exc:
            retire = getattr(runtime, "retire", None) if fresh else None
            for cleanup in (runtime.stop, retire):
                if cleanup is None:
                    continue
                try:
                    cleanup(model)
                except Exception as cleanup_error:  # already failing: report the first error
                    log.warning("cleaning up %s after a failed deployment: %s", model.model_name, cleanup_error)
            if isinstance(exc, RuntimeUnavailable):
                raise RuntimeUnavailable(
                    f"{model.model_name} on {runtime.name} failed before taking traffic: {exc}"
                ) from exc
            raise RuntimeUnavailable(
                f"{model.model_name} on {runtime.name} failed its smoke test: {type(exc).__name__}: {exc}"
            ) from exc
        return endpoint

    def _stop(self, book: DeploymentBook, role: str, model_name: str, runtime_name: str) -> None:
        version = book.version(role, model_name)
        adapter = version.adapter_hash if version else None
        model = ServedModel(role, model_name, Path(), None, adapter)
        try:
            self.runtime(runtime_name).stop(model)
        except Exception:  # a server that will not stop must not block the deployment that replaced it
            log.exception("could not stop %s on %s", model_name, runtime_name)

    def _retire(self, book: DeploymentBook, role: str, model_name: str) -> None:
        """A version beyond the kept ones: a runtime that stores models (Ollama) may delete it."""
        version = book.version(role, model_name)
        if version is None:
            return
        try:
            runtime = self.runtime(version.runtime)
        except RuntimeUnavailable:
            return
        retire = getattr(runtime, "retire", None)
        if retire is not None:
            try:
                retire(ServedModel(role, model_name, Path(), None, version.adapter_hash))
            except Exception:
                log.exception("could not retire %s on %s", model_name, version.runtime)

    def _promote(self, book: DeploymentBook, data: CanaryPassed) -> list[Payload]:
        """The canary passed: it takes all the traffic and the version that shared it stops."""
        current = book.service(data.role)
        if current is None or current.model_name != data.model_name or current.sharing_with is None:
            log.info("%s: canary %s is no longer the one in service; not promoted", data.role, data.model_name)
            return []
        return self._all_traffic(book, data.role)

    def _all_traffic(self, book: DeploymentBook, role: str) -> list[Payload]:
        """The canary in service takes all the role's traffic; the version that shared it stops."""
        current = book.service(role)
        assert current is not None and current.sharing_with is not None
        version = book.version(role, current.model_name)
        self._stop(book, role, current.sharing_with, current.runtime)
        return [DeploymentCompleted(
            role=role,
            runtime=current.runtime,
            model_name=current.model_name,
            adapter_hash=current.adapter_hash,
            evaluation_id=version.evaluation_id if version else None,
            traffic_share=1.0,
            endpoint=current.endpoint,
            previous_model_name=version.previous_model_name if version else None,
            previous_adapter_hash=version.previous_adapter_hash if version else None,
            kept=[v.model_name for v in book.kept(role)],
        )]

    # ------------------------------------------------------------------ forgotten data

    def _superseded(self, book: DeploymentBook, event: Event[Any], seq: int, data: DatasetSuperseded,
                    trained: list[TrainingCompleted]) -> list[Payload]:
        """An ``adapter.superseded`` for every adapter trained on the superseded dataset, and what it takes: a
        rollback, a retraining (the trainer answers), or a canary's partner stopped (see the module docstring)."""
        adapters = sorted({t.adapter_hash for t in trained if t.dataset_hash == data.old_hash})
        if not adapters:
            return []
        role = data.role
        mode = DeployerConfig.of(self.settings).on_forgotten
        current = book.service(role)
        serving = current.adapter_hash if current is not None else None
        partner = book.version(role, current.sharing_with) if current is not None and current.sharing_with else None
        outputs: list[Payload] = []
        roll_back = stop_partner = False
        for adapter in adapters:
            name = version_name(role, adapter)
            sharing = partner is not None and partner.adapter_hash == adapter
            if adapter == serving:
                action = "retrain" if mode == "retrain" and data.new_hash else "rollback"
                roll_back = roll_back or action == "rollback"
                if action == "retrain":
                    why = (f"in service and trained on forgotten data: the trainer trains {(data.new_hash or '')[:12]},"
                           " which goes through the gate (deployer.on_forgotten = retrain)")
                else:
                    why = ("in service and trained on forgotten data: the newest version not trained on it is put"
                           f" back (deployer.on_forgotten = {mode}"
                           + (", and nothing was left to retrain on)" if mode == "retrain" else ")"))
            else:
                action = "withdraw"
                stop_partner = stop_partner or sharing
                why = ("it served the rest of a canary's traffic: it stops and the canary takes all of it" if sharing
                       else "not in service; never a rollback target again")
            outputs.append(AdapterSuperseded(
                role=role, adapter_hash=adapter, model_name=name if book.version(role, name) else None,
                dataset_hash=data.old_hash, new_dataset_hash=data.new_hash, new_dataset_path=data.path,
                superseded_id=event.id, forgotten_id=data.forgotten_id, in_service=adapter == serving or sharing,
                action=action, detail=why[:2000],  # type: ignore[arg-type]
            ))
        # The book learns the withdrawals first, so a rollback passes over every version trained on the data;
        # only for this decision: the folded book learns them from the log, at their own positions.
        book.db.execute("SAVEPOINT withdrawals")
        try:
            for i, out in enumerate(outputs):
                book.apply(derived_event(out, cause=event, source=NAME, index=i), seq)
            if roll_back:
                outputs += self._rollback(book, role, f"the version in service was trained on data forgotten by"
                                          f" {data.forgotten_id} (dataset {data.old_hash[:12]} superseded)",
                                          "forgotten")
            elif stop_partner:
                outputs += self._all_traffic(book, role)
        finally:
            book.db.execute("ROLLBACK TO withdrawals")
            book.db.execute("RELEASE withdrawals")
        return outputs

    # ------------------------------------------------------------------ roll back

    def _drifted(self, book: DeploymentBook, data: DriftDetected) -> list[Payload]:
        current = book.service(data.role)
        if current is not None and data.model_name is not None and data.model_name != current.model_name:
            log.info("%s: drift of %s ignored, %s is in service now", data.role, data.model_name, current.model_name)
            return []
        reason = (
            f"drift.detected: {data.metric} fell from {data.baseline_value:.3g} to {data.current_value:.3g}"
            f" over the last {data.window} runs" + (f" (p={data.p_value:.3g})" if data.p_value is not None else "")
        )
        return self._rollback(book, data.role, reason, "drift")

    def _rollback(self, book: DeploymentBook, role: str, reason: str, trigger: str) -> list[Payload]:
        runtime_name = DeployerConfig.of(self.settings).runtime
        current = book.service(role)

        def failed(why: str, adapter: str | None = None) -> list[Payload]:
            return [DeploymentFailed(role=role, runtime=runtime_name, adapter_hash=adapter,
                                     reason=f"rollback refused: {why}"[:2000])]

        if current is None:
            return failed(f"nothing is in service for role {role!r}, so there is nothing to roll back")
        target = book.previous(role)
        if target is None:
            return failed(f"{current.model_name} (the base model) is in service; there is no version before it")
        target_name, target_adapter = target
        try:
            model = self.served_model(role, target_adapter)
        except Refused as exc:
            return failed(f"cannot serve {target_name} again: {exc}", target_adapter)
        runtime = self.runtime(runtime_name)
        try:
            endpoint = self._serve_and_smoke(runtime, model)
        except RuntimeUnavailable as exc:
            return failed(str(exc), target_adapter)
        if current.model_name != model.model_name:
            self._stop(book, role, current.model_name, current.runtime)
        return [DeploymentRolledBack(
            role=role,
            runtime=runtime_name,
            from_adapter=current.adapter_hash,
            to_adapter=target_adapter,
            reason=reason[:2000],
            from_model_name=current.model_name,
            to_model_name=model.model_name,
            trigger=trigger,  # type: ignore[arg-type]
            endpoint=endpoint,
        )]

    # ------------------------------------------------------------------ the engine's life

    def start(self, ctx: ProcessContext) -> None:
        """The worker starts: take the registered runtimes, serve again in the background what is in
        service, and stop every server when the process ends."""
        if self.runtime_factory is None:
            self.runtime_factory = runtimes_of(ctx.plugins)
        if ctx.artifacts is not None:
            self.artifacts = ctx.artifacts.in_thread()
        db = sqlite3.connect(ctx.state.path, check_same_thread=False)  # its own connection: read in a thread
        threading.Thread(target=self.restore, args=(db,), name="deployer-restore", daemon=True).start()
        atexit.register(self.close)

    def restore(self, db: sqlite3.Connection) -> None:
        """Serve again what the book says is in service (engine start); failures are logged, not raised."""
        with self.lock, contextlib.closing(db):
            book = DeploymentBook(db, create=False)
            for service in book.services():
                names = [(service.model_name, service.adapter_hash, service.endpoint)]
                if service.sharing_with:
                    previous = book.version(service.role, service.sharing_with)
                    names.append((service.sharing_with, previous.adapter_hash if previous else None, None))
                for name, adapter, endpoint in names:
                    try:
                        model = self.served_model(service.role, adapter)
                        port = urlparse(endpoint).port if endpoint else None
                        url = self._serve_and_smoke(self.runtime(service.runtime), model, port)
                        log.info("restored %s for %s at %s", name, service.role, url)
                    except (Refused, RuntimeUnavailable) as exc:
                        log.error("could not serve %s for %s again: %s", name, service.role, exc)

    def close(self) -> None:
        """Stop every server this deployer's runtimes started (the engine stops)."""
        with self.lock:
            runtimes = list(self.runtimes.values())
        for runtime in runtimes:
            close = getattr(runtime, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:
                    log.exception("could not close runtime %s", runtime.name)



def _serve(runtime: Runtime, model: ServedModel, port: int | None) -> str:
    """``runtime.serve(model)``, on ``port`` when it is free."""
    if port:
        try:
            return runtime.serve(model, port=port)
        except RuntimeUnavailable:
            log.info("port %d is taken; %s gets another", port, model.model_name)
    return runtime.serve(model)


def processor(settings: Settings, runtime_factory: RuntimeMaker | None = None) -> Processor:
    """The deployer processor, configured by ``settings``."""
    deployer = Deployer(settings, runtime_factory)
    return Processor(
        name=NAME,
        consumes=CONSUMES,
        handle=deployer.handle,
        description="deploys versions that passed their evaluation; rolls back on drift or by hand",
        produces=("deployment.completed", "deployment.failed", "deployment.rolled_back", "adapter.superseded"),
        stateful=True,
        tables=TABLES,
        fold=fold_book,
        folds=BOOK_EVENTS,
        state_version=2,
        # one input at a time: the next decision reads a book that holds this one's outputs
        batch=1,
        on_start=deployer.start,
        on_stop=deployer.close,
    )


def fold_book(db: sqlite3.Connection, event: Event[Any], seq: int) -> None:
    """The deployer's state: the deployment book, folded from the log (its own decisions included,
    once they are on the log)."""
    DeploymentBook(db, create=False).apply(event, seq)
