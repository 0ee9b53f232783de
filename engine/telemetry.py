"""OpenTelemetry: spans for publish and process, W3C trace context in NATS headers.

Off by default (the API's no-op tracer costs next to nothing). ``configure`` installs an
SDK tracer provider with the configured exporter; tests pass their own span processor.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from flywheel_loop.engine.config import TelemetryConfig

_propagator = TraceContextTextMapPropagator()
tracer = trace.get_tracer("flywheel")
_enabled = False


def enabled() -> bool:
    """Whether spans are recorded (the engine skips trace bookkeeping when not)."""
    return _enabled


def configure(cfg: TelemetryConfig, span_processor: Any | None = None) -> None:
    """Install a tracer provider for the configured exporter (``none`` installs nothing)."""
    if cfg.exporter == "none" and span_processor is None:
        return
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    provider = TracerProvider(resource=Resource.create({"service.name": cfg.service_name}))
    if span_processor is not None:
        provider.add_span_processor(span_processor)
    elif cfg.exporter == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    elif cfg.exporter == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError as exc:
            raise RuntimeError(
                "telemetry.exporter = 'otlp' needs opentelemetry-exporter-otlp-proto-http installed"
            ) from exc
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=cfg.otlp_endpoint)))
    trace.set_tracer_provider(provider)
    global tracer, _enabled
    tracer = provider.get_tracer("flywheel")
    _enabled = True


def inject(headers: dict[str, str]) -> None:
    """Write the current trace context (``traceparent``) into message headers."""
    _propagator.inject(headers)


@contextmanager
def span_from_headers(name: str, headers: Mapping[str, str] | None, **attrs: Any) -> Iterator[Any]:
    """A span that continues the trace carried by an incoming message."""
    ctx = _propagator.extract(dict(headers or {}))
    token = otel_context.attach(ctx)
    try:
        with tracer.start_as_current_span(name, attributes=attrs) as span:
            yield span
    finally:
        otel_context.detach(token)


@contextmanager
def span(name: str, **attrs: Any) -> Iterator[Any]:
    with tracer.start_as_current_span(name, attributes=attrs) as s:
        yield s
