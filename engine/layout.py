"""The state folder's layout: the one place that knows where local files go.

Everything under the state folder is either the embedded server's data (``nats/``) or a
cache: projections and each processor's own files, which the log rebuilds, and the artifacts
(datasets, adapters, training runs, base models), which are objects on the bus
(``engine/artifacts.py``) fetched into ``<kind>/<key>`` on use; vectors are recomputed from the log.

    <state_dir>/
      nats/                      the embedded nats-server's JetStream files
      projections/<name>.sqlite  read models folded from the log
      processors/<name>/         a processor's state store and scratch files
      datasets/<sha256>/         curated datasets (content-addressed)
      adapters/<sha256>/         trained LoRA adapters (content-addressed)
      runs/<run_id>/             training runs: checkpoints, so a killed run resumes
      models/                    base models converted once (e.g. from GGUF)
      vectors/                   prompt embeddings (LanceDB)
      cache/                     tokenizers and other derived files
      spill/                     events an agent could not publish yet
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["StateLayout"]


@dataclass(frozen=True)
class StateLayout:
    """Paths under one state folder. Nothing is created until asked for."""

    root: Path

    @property
    def nats(self) -> Path:
        return self.root / "nats"

    @property
    def datasets(self) -> Path:
        return self.root / "datasets"

    @property
    def adapters(self) -> Path:
        return self.root / "adapters"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def vectors(self) -> Path:
        return self.root / "vectors"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def spill(self) -> Path:
        return self.root / "spill"

    def dataset(self, digest: str) -> Path:
        return self.datasets / digest

    def adapter(self, digest: str) -> Path:
        return self.adapters / digest

    def run(self, run_id: str) -> Path:
        return self.runs / run_id

    def artifact(self, kind: str, key: str) -> Path:
        """The cache folder of the artifact ``<kind>/<key>`` (kind: datasets, adapters, runs, models)."""
        return self.root / kind / key

    def projection(self, name: str) -> Path:
        return self.root / "projections" / f"{name}.sqlite"

    def processor(self, name: str) -> Path:
        return self.root / "processors" / name

    def replay(self, name: str) -> Path:
        return self.root / "replays" / f"{name}.sqlite"
