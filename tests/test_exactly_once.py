"""Exactly once after the duplicate window: an input redelivered later than ``streams.duplicate_window_s``
(its first delivery published its outputs, then the acks were lost, and the consumer held it past the window)
produces no second output, for a stateless processor (the built-in anonymizer: its outputs are looked up on
the log) and a stateful one (its fold of the log knows the input is answered, so its step does not run
again). A control publish shows that JetStream itself would have stored the duplicate by then."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from nats.aio.msg import Msg

from flywheel_loop.engine.bus import Bus
from flywheel_loop.engine.config import Settings
from flywheel_loop.engine.processor import ProcessContext, Processor
from flywheel_loop.engine.worker import ProcessorWorker
from flywheel_loop.plugins.privacy import anonymizer
from flywheel_loop.schemas import (
    Event,
    InteractionAnonymized,
    InteractionRecorded,
    QualityAssessed,
    RollbackRequested,
    new_event,
)
from tests.conftest import read_log

WINDOW_S = 1.0
ACK_WAIT_S = 2.5  # longer than the window: a redelivery comes after it


class Tally:
    """A stateful processor that counts how often its step really runs."""

    def __init__(self) -> None:
        self.runs = 0

    def handle(self, event: Event[Any], ctx: ProcessContext) -> list[QualityAssessed]:
        self.runs += 1
        iid = event.data.interaction_id
        return [QualityAssessed(interaction_id=iid, role="coder", scores={"x": 1.0}, reward=1.0, confidence=1.0)]


@dataclass
class Case:
    processor: Processor
    inputs: list[Event[Any]]
    output: str  # the type of its outputs
    runs: Callable[[], int | None]  # how often the step ran (None: not counted)
    looked_up: bool  # its outputs of a redelivered input are looked up on the log (else its fold answers)


def recorded(i: int) -> Event[Any]:
    return new_event(InteractionRecorded(session_id=f"s{i}", role="coder", model_id="m", input=f"task {i}",
                                         output="ok"), source="agent")


def stateless(settings: Settings) -> Case:
    inputs = [recorded(i) for i in range(5)]
    return Case(anonymizer.processor(settings), inputs, "interaction.anonymized", lambda: None, True)


def stateful(settings: Settings) -> Case:
    tally = Tally()
    processor = Processor("tally", ("interaction.anonymized",), tally.handle, produces=("quality.assessed",),
                          stateful=True)
    inputs = []
    for i in range(5):
        raw = recorded(i)
        inputs.append(new_event(InteractionAnonymized(interaction_id=raw.id, interaction=raw.data), source="test"))
    return Case(processor, inputs, "quality.assessed", lambda: tally.runs, False)


@pytest.mark.parametrize("make", [stateless, stateful], ids=["stateless anonymizer", "stateful, folded"])
async def test_an_input_redelivered_after_the_duplicate_window_produces_no_second_output(
    settings: Settings, make: Callable[[Settings], Case], monkeypatch: pytest.MonkeyPatch,
) -> None:
    short = settings.model_copy(update={
        "streams": settings.streams.model_copy(update={"duplicate_window_s": WINDOW_S}),
        "worker": settings.worker.model_copy(update={"ack_wait_s": ACK_WAIT_S}),
    })
    bus = await Bus.connect(short, short.nats.url or "")
    await bus.ensure_streams()
    try:
        case = make(short)
        inputs, processor = case.inputs, case.processor
        await bus.publish_many(inputs)
        worker = ProcessorWorker(bus, processor)
        await worker.subscribe()

        # first delivery: the outputs are published, then the worker dies before its acks reach the server
        first = await worker._sub.fetch(len(inputs), timeout=5)
        assert len(first) == len(inputs)

        async def lost(self: Msg, *args: Any, **kwargs: Any) -> None:
            return None

        with monkeypatch.context() as m:
            m.setattr(Msg, "ack", lost)
            await worker.process_batch(first)
        probe = new_event(RollbackRequested(role="coder", reason="probe"), source="test")
        await bus.publish(probe)  # published after the outputs: once it may be stored again, so may they
        produced = await read_log(bus, "log", case.output)
        assert len(produced) == len(inputs)

        # the consumer holds the inputs past ack_wait, longer than the window, then hands them out again
        again = await worker._sub.fetch(len(inputs), timeout=ACK_WAIT_S * 4)
        assert sorted(m.metadata.sequence.stream for m in again) == sorted(m.metadata.sequence.stream for m in first)
        assert all(m.metadata.num_delivered == 2 for m in again)
        control = await bus.publish(probe)
        assert not control.duplicate  # the window has passed: JetStream alone would now store a second copy
        await worker.process_batch(again)

        outputs = await read_log(bus, "log", case.output)
        assert len(outputs) == len(inputs)  # no second output
        assert sorted(e.causation_id for e in outputs) == sorted(e.id for e in inputs)
        assert outputs == produced
        assert worker.stats.already_stored == (len(inputs) if case.looked_up else 0)
        assert case.runs() in (None, len(inputs))  # the stateful step ran once per input: its fold answered the rest
        info = await bus.js.consumer_info(worker.stream_name, processor.name)
        assert info.num_ack_pending == 0 and info.num_pending == 0  # acked this time
        assert len(await read_log(bus, "log", "rollback.requested")) == 2  # the probe, stored twice
        worker.close()
    finally:
        await bus.close()
