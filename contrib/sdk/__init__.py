"""Flywheel's agent SDK: what an agent process needs, and nothing heavier.

- ``Recorder`` / ``SyncRecorder`` (``recorder``): record interactions, feedback and outcomes
  through a bounded buffer, published in the background with acks and dedupe ids;
- ``Selector`` (``selector``): choose a prompt variant or a model from the rewards on the log;
- ``NatsOptions`` / ``options_from_env`` (``client``): where the bus is.

    pip install flywheel-loop-sdk      # pulls flywheel-loop-schemas and nats-py, no torch
"""

from flywheel_loop.sdk.client import BusUnavailable, NatsOptions, PublishFailed, options_from_env
from flywheel_loop.sdk.recorder import BufferFull, Recorder, RecorderError, SyncRecorder
from flywheel_loop.sdk.selector import NoEligibleArm, Selector

__all__ = [
    "BufferFull",
    "BusUnavailable",
    "NatsOptions",
    "NoEligibleArm",
    "PublishFailed",
    "Recorder",
    "RecorderError",
    "Selector",
    "SyncRecorder",
    "options_from_env",
]
