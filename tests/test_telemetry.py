"""One interaction's trace crosses every plugin hop through W3C trace context in headers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from flywheel_loop.engine import telemetry
from flywheel_loop.engine.bus import Bus
from flywheel_loop.engine.config import Settings, TelemetryConfig
from flywheel_loop.engine.hookspecs import hookimpl
from flywheel_loop.engine.processor import ProcessContext, Processor
from flywheel_loop.schemas import Event, InteractionRecorded, QualityAssessed, new_event
from tests.conftest import RunningEngine, read_log, wait_for
from tests.counting_plugin import CountingPlugin


class Scorer:
    """A second hop: scores what the pass-through produced."""

    @hookimpl
    def register_processors(self, register: Callable[[Processor], None], settings: Settings) -> None:
        def score(event: Event[Any], ctx: ProcessContext) -> list[QualityAssessed]:
            return [QualityAssessed(interaction_id=event.data.interaction_id, role="coder",
                                    scores={"x": 1.0}, reward=1.0, confidence=1.0)]

        register(Processor("scorer", ("interaction.anonymized",), score))


async def test_a_trace_follows_an_interaction_through_two_hops(
    bus: Bus, engine_with: Callable[..., RunningEngine]
) -> None:
    exporter = InMemorySpanExporter()
    telemetry.configure(TelemetryConfig(exporter="none"), span_processor=SimpleSpanProcessor(exporter))
    async with engine_with(CountingPlugin(), Scorer(), builtins=False):
        with telemetry.span("agent turn") as root:
            await bus.publish(new_event(
                InteractionRecorded(session_id="s", role="coder", model_id="m", input="i", output="o"),
                source="agent"))
        await wait_for(lambda: read_log(bus, "log", "quality.assessed"))
    spans = {s.name: s for s in exporter.get_finished_spans()}
    trace_id = root.get_span_context().trace_id
    assert spans["process pass_through"].context.trace_id == trace_id
    assert spans["process scorer"].context.trace_id == trace_id
    assert spans["process scorer"].parent.span_id == spans["process pass_through"].context.span_id
