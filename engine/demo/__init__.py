"""``flywheel demo``: the engine turning on the embedded defaults.

- ``run_demo`` (``engine/demo/run.py``, the default): the end-to-end loop with the real base
  model: a simulated coding agent works small coding tasks (``tasks.toml``), the tests run, a
  simulated human corrects it towards a project convention, and the engine builds a dataset,
  trains, gates and deploys an adapter; before/after figures are read back from the log.
- ``run_bandit_demo`` (``engine/demo/bandits.py``, ``flywheel demo --bandits``): no model; a
  simulated agent whose success rates per (model, prompt variant) the bandits learn.
"""

from engine.demo.bandits import run_bandit_demo
from engine.demo.run import DemoError, DemoSummary, run_demo

__all__ = ["DemoError", "DemoSummary", "run_bandit_demo", "run_demo"]
